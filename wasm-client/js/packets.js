// webnic in raw-packet mode: the session's IP packets as a pair of WHATWG streams, for pages that
// bring their own TCP/IP stack (an emulator's guest, a userspace VPN, a packet tool).
//
//   import { connectPackets } from './packets.js';
//   const nic = await connectPackets('https://gw:4433/webnic', { serverCertificateHashes });
//   const writer = nic.packets.writable.getWriter();
//   await writer.write(ipPacket);                 // source must be nic.ipv4 (or nic.ipv6)
//   for await (const packet of nic.packets.readable) { ... }
//
// No stack runs in the page: the gateway still checks every packet's source address and applies
// its egress policy. Writes resolve once the browser's datagram queue has room (backpressure).
import init, { connectRaw } from '../pkg/webnic_wasm.js';

let ready = null;

/** Loads the wasm module once (its URL defaults to next to webnic_wasm.js). */
export function loadWasm(moduleOrPath) {
  if (!ready) ready = init(moduleOrPath === undefined ? undefined : { module_or_path: moduleOrPath });
  return ready;
}

/** A session in raw-packet mode. */
export class PacketNic {
  #raw;
  #packets;

  /** @param raw the wasm `RawNic` */
  constructor(raw) {
    this.#raw = raw;
  }

  /**
   * `{ readable, writable }`: one `Uint8Array` per IP packet each way. Created on first use: a
   * readable stream pulls packets as soon as it exists, so a page that hands the session to
   * another consumer (js/v86.js reads `raw` itself) must not touch this.
   */
  get packets() {
    if (!this.#packets) {
      const raw = this.#raw;
      const readable = new ReadableStream({
        pull: async (controller) => {
          const packet = await raw.recv();
          if (packet === undefined) controller.close(); else controller.enqueue(packet);
        },
      }, { highWaterMark: 64 });
      const writable = new WritableStream({
        write: (packet) => raw.send(packet),
      }, { highWaterMark: 64 });
      this.#packets = Object.freeze({ readable, writable });
    }
    return this.#packets;
  }

  /** The wasm `RawNic` (what `EthernetAdapter` is built from). */
  get raw() { return this.#raw; }
  /** The session's IPv4 address, or `undefined`. */
  get ipv4() { return this.#raw.ipv4; }
  /** The session's IPv6 address, or `undefined`. */
  get ipv6() { return this.#raw.ipv6; }
  /** The largest IP packet to send. */
  get mtu() { return this.#raw.mtu; }
  /** The resolvers the gateway announced. */
  get dnsServers() { return this.#raw.dnsServers; }
  /** Resolves with the reason once the session has ended. */
  get closed() { return this.#raw.closed(); }
  /** Ends the session; the gateway frees the address. */
  close() { this.#raw.close(); }
}

/**
 * Opens a session in raw-packet mode.
 * @param {string} url the gateway's WebTransport URL
 * @param {{ serverCertificateHashes?: object[], wasm?: string | URL | WebAssembly.Module }} options
 * @returns {Promise<PacketNic>}
 */
export async function connectPackets(url, options = {}) {
  await loadWasm(options.wasm);
  return new PacketNic(await connectRaw(url, options.serverCertificateHashes));
}
