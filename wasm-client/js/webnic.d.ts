// Types of js/webnic.js: webnic's Direct Sockets-shaped API.

export interface WebNicConnectOptions {
  /** Passed to `new WebTransport()` unchanged, e.g. [{ algorithm: 'sha-256', value: bytes }]. */
  serverCertificateHashes?: { algorithm: string; value: BufferSource }[];
  /**
   * How long (ms) a session whose connection is lost (network change, gateway restart) keeps
   * trying to resume on a new one with the gateway's ticket; its TCP connections carry on when
   * it does. Default 60000 (the gateway's default grace period); 0 turns resumption off.
   */
  reconnectFor?: number;
  /**
   * Link repair (docs/PROTOCOL.md §3.1): the gateway numbers its datagrams and resends the ones
   * the page reports missing, so loss between gateway and page reaches TCP as a short delay
   * instead of a loss. Default true.
   */
  linkRepair?: boolean;
  /**
   * Stream link (docs/PROTOCOL.md §3.2): the gateway sends the page's packets on one QUIC stream
   * instead of datagrams: faster downloads in browsers that deliver datagrams one read at a
   * time, but a loss on the path holds up every connection until QUIC repairs it. Default true;
   * when true, no link repair.
   */
  linkStream?: boolean;
  /**
   * The wasm file or its URL (default: next to pkg/webnic_wasm.js). With `worker: true`, a URL
   * or a WebAssembly.Module (what can be posted to the worker).
   */
  wasm?: string | URL | Response | BufferSource | WebAssembly.Module;
  /**
   * Run the stack in a dedicated Worker (js/webnic-worker.js) instead of this thread; the socket
   * objects are the same either way. Default false: this thread measured faster (docs/BROWSER.md).
   */
  worker?: boolean;
  /** A session token from `webnic-gateway token` (sent as `?token=` in the session URL). */
  token?: string;
}

/**
 * The gateway refused or ended the session. `name` says why (from the close code in
 * docs/PROTOCOL.md): 'TokenMissingError', 'TokenInvalidError', 'TokenExpiredError',
 * 'TokenNotYetValidError', 'TooManySessionsPerAddressError', 'TooManySessionsPerSubjectError',
 * 'TooManySessionsError', 'RateLimitedError', 'MaxLifetimeError', 'PoolExhaustedError', ...
 */
export declare class WebNicSessionError extends Error {
  readonly closeCode: number;
}

/**
 * As in Direct Sockets; `new TCPSocket` throws a TypeError for a size of 0 or out of range, a
 * keepAliveDelay below 1000 ms, or another dnsQueryType. Buffer sizes above 16 MiB are clamped.
 */
export interface TCPSocketOptions {
  /** Disables Nagle's algorithm. Default here: true (the spec's default is false). */
  noDelay?: boolean;
  /** Idle time in ms before TCP keep-alive probes start (one per delay; 9 unanswered end it). */
  keepAliveDelay?: number;
  sendBufferSize?: number;
  /** Also sets the largest TCP window (and so the window-scale factor). Default 1 MiB. */
  receiveBufferSize?: number;
  /** Resolve a host name to A records only ('ipv4') or AAAA only ('ipv6'); default A then AAAA. */
  dnsQueryType?: 'ipv4' | 'ipv6';
}

export interface TCPSocketOpenInfo {
  readable: ReadableStream<Uint8Array>;
  writable: WritableStream<BufferSource>;
  remoteAddress: string;
  remotePort: number;
  localAddress: string;
  localPort: number;
}

export interface TCPSocket {
  readonly opened: Promise<TCPSocketOpenInfo>;
  readonly closed: Promise<void>;
  close(): Promise<void>;
}

/** Connected mode: every datagram goes to (and only datagrams from) this peer. */
export interface UDPSocketConnectedOptions {
  remoteAddress: string;
  remotePort: number;
}

/** Bound mode: each outgoing message names its destination. */
export interface UDPSocketBoundOptions {
  /** The session's address, or '0.0.0.0' / '::'. */
  localAddress: string;
  /** 0 or absent picks a free port. */
  localPort?: number;
}

export interface UDPMessage {
  data: Uint8Array;
  remoteAddress: string;
  remotePort: number;
}

export interface UDPOutgoingMessage {
  data: BufferSource;
  /** Required in bound mode, ignored in connected mode. */
  remoteAddress?: string;
  remotePort?: number;
}

export interface UDPSocketOpenInfo {
  readable: ReadableStream<UDPMessage>;
  writable: WritableStream<UDPOutgoingMessage>;
  /** Connected mode only. */
  remoteAddress?: string;
  remotePort?: number;
  localAddress: string;
  localPort: number;
}

export interface UDPSocket {
  readonly opened: Promise<UDPSocketOpenInfo>;
  readonly closed: Promise<void>;
  close(): Promise<void>;
}

export interface TCPServerSocketOptions {
  /** 0 or absent picks a free port. */
  localPort?: number;
  /** Connections being set up or waiting to be read from `readable` (default 128). */
  backlog?: number;
}

export interface TCPServerSocketOpenInfo {
  /** One TCPSocket per accepted connection; its `opened` resolves at once. */
  readable: ReadableStream<TCPSocket>;
  localAddress: string;
  localPort: number;
}

export interface TCPServerSocket {
  readonly opened: Promise<TCPServerSocketOpenInfo>;
  readonly closed: Promise<void>;
  /** Stops listening; accepted connections stay open. */
  close(): Promise<void>;
}

export interface WebNicStats {
  packetsSent: number;
  packetsReceived: number;
  bytesSent: number;
  bytesReceived: number;
  drops: number;
  /** Connections the session resumed on after losing one. */
  reconnects: number;
  /** Link repair: datagrams the gateway sequenced. */
  linkSequenced: number;
  /** Link repair: packets that arrived after the page reported them missing. */
  linkRepaired: number;
  /** Link repair: missing packets given up on (TCP repaired them end to end). */
  linkGaveUp: number;
  /** Link repair: sequence numbers asked for. */
  linkNacked: number;
  /** Packets that came on the stream link. */
  linkStreamPackets: number;
}

export declare class WebNic {
  static connect(url: string, options?: WebNicConnectOptions): Promise<WebNic>;
  readonly TCPSocket: new (remoteAddress: string, remotePort: number, options?: TCPSocketOptions) => TCPSocket;
  readonly UDPSocket: new (options: UDPSocketConnectedOptions | UDPSocketBoundOptions) => UDPSocket;
  readonly TCPServerSocket: new (localAddress: string, options?: TCPServerSocketOptions) => TCPServerSocket;
  readonly address: string;
  readonly addressV6: string | undefined;
  readonly mtu: number;
  readonly closed: Promise<string>;
  /** Whether the stack runs in a dedicated Worker. */
  readonly worker: boolean;
  /** With a worker, a snapshot at most 100 ms old. */
  stats(): WebNicStats;
  /**
   * Defines TCPSocket, UDPSocket and TCPServerSocket on `target` (default globalThis) where it
   * has none, bound to this session; returns the names it defined.
   */
  installGlobals(target?: object): string[];
  close(): void;
}

export default WebNic;
