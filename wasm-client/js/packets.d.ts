// Types of js/packets.js: a webnic session in raw-packet mode.
import type { RawNic } from '../pkg/webnic_wasm.js';

export interface PacketOptions {
  /** Passed to `new WebTransport` (ECDSA certificates valid ≤ 14 days). */
  serverCertificateHashes?: { algorithm: 'sha-256'; value: BufferSource }[];
  /** Where to load webnic_wasm_bg.wasm from (default: next to webnic_wasm.js). */
  wasm?: string | URL | WebAssembly.Module;
}

/** A session whose IP packets the page sends and receives itself. */
export class PacketNic {
  constructor(raw: RawNic);
  /** One `Uint8Array` per IP packet each way; writes resolve once the datagram queue has room. */
  readonly packets: { readonly readable: ReadableStream<Uint8Array>; readonly writable: WritableStream<Uint8Array> };
  /** The wasm session (what `EthernetAdapter` is built from). */
  readonly raw: RawNic;
  /** The session's IPv4 address: the only IPv4 source the gateway accepts. */
  readonly ipv4: string | undefined;
  /** The session's IPv6 address, if the gateway offers IPv6. */
  readonly ipv6: string | undefined;
  /** The largest IP packet to send. */
  readonly mtu: number;
  /** The resolvers the gateway announced. */
  readonly dnsServers: string[];
  /** Resolves with the reason once the session has ended. */
  readonly closed: Promise<string>;
  /** Ends the session; the gateway frees the address. */
  close(): void;
}

/** Loads the wasm module once. */
export function loadWasm(moduleOrPath?: string | URL | WebAssembly.Module): Promise<unknown>;

/** Opens a session in raw-packet mode. */
export function connectPackets(url: string, options?: PacketOptions): Promise<PacketNic>;
