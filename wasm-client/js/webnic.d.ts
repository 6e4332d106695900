// Types of js/webnic.js: webnic's Direct Sockets-shaped API.

export interface WebNicConnectOptions {
  /** Passed to `new WebTransport()` unchanged, e.g. [{ algorithm: 'sha-256', value: bytes }]. */
  serverCertificateHashes?: { algorithm: string; value: BufferSource }[];
  /** The wasm file or its URL (default: next to pkg/webnic_wasm.js). */
  wasm?: string | URL | Response | BufferSource | WebAssembly.Module;
}

export interface TCPSocketOptions {
  noDelay?: boolean;
  sendBufferSize?: number;
  receiveBufferSize?: number;
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

export interface WebNicStats {
  packetsSent: number;
  packetsReceived: number;
  bytesSent: number;
  bytesReceived: number;
  drops: number;
}

export declare class WebNic {
  static connect(url: string, options?: WebNicConnectOptions): Promise<WebNic>;
  readonly TCPSocket: new (remoteAddress: string, remotePort: number, options?: TCPSocketOptions) => TCPSocket;
  readonly address: string;
  readonly addressV6: string | undefined;
  readonly mtu: number;
  readonly closed: Promise<string>;
  stats(): WebNicStats;
  close(): void;
}

export default WebNic;
