// webnic for v86: the emulated guest's NIC on a webnic session. The guest's own TCP/IP stack gets
// its address by DHCP (and IPv6 by router advertisement) from webnic-stack's Ethernet adapter,
// which runs here in wasm; its IP packets travel as the session's, through the gateway.
//
//   import V86 from 'v86';                       // libv86.mjs
//   import { WebnicV86Adapter } from 'webnic/js/v86.js';
//   const emulator = new V86({ wasm_path, bios, vga_bios, bzimage, initrd, net_device: { type: 'virtio' } });
//   const nic = await WebnicV86Adapter.connect(emulator.bus, 'https://gw:4433/webnic',
//                                              { serverCertificateHashes });
//
// It speaks the bus protocol of v86's own network adapters: frames from the guest arrive as
// `net0-send`, frames for the guest leave as `net0-receive`.
import { EthernetAdapter } from '../pkg/webnic_wasm.js';
import { connectPackets } from './packets.js';

// Packets waiting for room in the datagram queue: a guest outrunning the session loses the rest
// (v86's bus has no backpressure), as it would on a full router queue; TCP resends.
const MAX_QUEUED = 512;

export class WebnicV86Adapter {
  #bus;
  #id;
  #nic;
  #adapter;
  #onEvent;
  #queue = [];
  #sending = false;
  #queueDrops = 0;
  #closed = false;
  #onSend;

  /**
   * Opens a raw-packet session and attaches it to `bus` (a v86 emulator's `emulator.bus`).
   * @param bus v86's bus
   * @param {string} url the gateway's WebTransport URL
   * @param {{ serverCertificateHashes?: object[], wasm?: string | URL, id?: number,
   *           onEvent?: (line: string) => void }} options
   */
  static async connect(bus, url, options = {}) {
    const nic = await connectPackets(url, options);
    return new WebnicV86Adapter(bus, nic, options);
  }

  /** Attaches an open `PacketNic` (from packets.js) to `bus`. */
  constructor(bus, nic, { id = 0, onEvent } = {}) {
    this.#bus = bus;
    this.#id = id;
    this.#nic = nic;
    this.#onEvent = onEvent;
    this.#adapter = new EthernetAdapter(nic.raw);
    this.#onSend = (frame) => this.#fromGuest(frame);
    bus.register(`net${id}-send`, this.#onSend, this);
    this.#pump();
  }

  /** The session (addresses, MTU, resolvers, `closed`). */
  get nic() { return this.#nic; }

  /** The adapter's counters, plus packets dropped because the session's queue was full. */
  stats() {
    return { ...this.#adapter.stats(), queueDrops: this.#queueDrops };
  }

  /** Detaches from the bus and ends the session. */
  destroy() {
    this.#closed = true;
    this.#bus.unregister(`net${this.#id}-send`, this.#onSend);
    this.#nic.close();
  }

  #fromGuest(frame) {
    const packet = this.#adapter.handleFrame(frame);
    if (packet !== undefined) {
      if (this.#queue.length >= MAX_QUEUED) this.#queueDrops += 1; else this.#queue.push(packet);
      if (!this.#sending) this.#drain();
    }
    this.#flush();
  }

  // Sends queued packets in order, each awaiting room in the datagram queue.
  async #drain() {
    this.#sending = true;
    try {
      while (this.#queue.length > 0 && !this.#closed) {
        await this.#nic.raw.send(this.#queue.shift());
      }
    } catch (error) {
      this.#onEvent?.(`session send failed: ${error.message ?? error}`);
    } finally {
      this.#sending = false;
    }
  }

  // Session → guest, until the session ends.
  async #pump() {
    const raw = this.#nic.raw;
    try {
      for (;;) {
        const packet = await raw.recv();
        if (packet === undefined || this.#closed) break;
        const frame = this.#adapter.encapsulate(packet);
        if (frame !== undefined) this.#bus.send(`net${this.#id}-receive`, frame);
        this.#flush();
      }
    } catch (error) {
      this.#onEvent?.(`session receive failed: ${error.message ?? error}`);
    }
  }

  // Replies (ARP, DHCP, RA, NA) to the guest; events to the caller.
  #flush() {
    for (let frame = this.#adapter.pollFrame(); frame !== undefined; frame = this.#adapter.pollFrame()) {
      this.#bus.send(`net${this.#id}-receive`, frame);
    }
    for (let line = this.#adapter.pollEvent(); line !== undefined; line = this.#adapter.pollEvent()) {
      this.#onEvent?.(line);
    }
  }
}

export default WebnicV86Adapter;
