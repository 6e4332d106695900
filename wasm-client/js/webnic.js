// webnic for web pages: Direct Sockets-shaped TCP and UDP over a WebTransport session to a webnic gateway.
//
//   import { WebNic } from './webnic.js';
//   const nic = await WebNic.connect('https://gw:4433/webnic', { serverCertificateHashes });
//   const socket = new nic.TCPSocket('10.0.0.2', 80);
//   const { readable, writable } = await socket.opened;
//   const udp = new nic.UDPSocket({ remoteAddress: '10.0.0.2', remotePort: 53 });
//   const server = new nic.TCPServerSocket(nic.address, { localPort: 8080 });
//
// The TCP/IP stack is webnic-stack compiled to wasm (pkg/webnic_wasm.js); this file only shapes
// its handle-based calls into the objects of the WICG Direct Sockets spec.
import init, { connect as connectWasm } from '../pkg/webnic_wasm.js';

let ready = null;

/** Loads the wasm module once (its URL defaults to next to webnic_wasm.js). */
function load(moduleOrPath) {
  if (!ready) ready = init(moduleOrPath === undefined ? undefined : { module_or_path: moduleOrPath });
  return ready;
}

// Largest chunk one read pulls from the stack: bigger means fewer calls, smaller means the
// window reopens sooner for a slow reader.
const READ_CHUNK = 64 * 1024;

// Options key under which TCPServerSocket hands an accepted connection's id to TCPSocket.
const ACCEPTED = Symbol('accepted');

/** Turns the wasm side's "Name: message" errors into DOMExceptions with the spec's names. */
function domError(error) {
  const message = String(error && error.message !== undefined ? error.message : error);
  const match = /^(NetworkError|InvalidStateError|NotAllowedError|DataError): (.*)$/s.exec(message);
  if (/^TypeError: /.test(message)) return new TypeError(message.slice('TypeError: '.length));
  return match ? new DOMException(match[2], match[1]) : new DOMException(message, 'NetworkError');
}

export class WebNic {
  #nic;
  #closed;

  constructor(nic) {
    this.#nic = nic;
    this.#closed = nic.closed();
    const owner = this;
    /** A TCP connection through the tunnel, shaped like Direct Sockets' `TCPSocket`. */
    this.TCPSocket = class TCPSocket {
      #id = null;
      #closedResolve;
      #closedReject;
      #done = false;
      constructor(remoteAddress, remotePort, options = {}) {
        this.closed = new Promise((resolve, reject) => {
          this.#closedResolve = resolve;
          this.#closedReject = reject;
        });
        // Nobody has to observe `closed`.
        this.closed.catch(() => {});
        const opening = options[ACCEPTED] !== undefined
          ? owner.#streams(this, options[ACCEPTED])
          : owner.#open(this, String(remoteAddress), Number(remotePort), options);
        this.opened = opening.then(
          (opened) => opened,
          (error) => {
            const dom = domError(error);
            this.#finish(dom);
            throw dom;
          },
        );
      }
      /** @internal */
      _setId(id) { this.#id = id; }
      /** @internal */
      _finish(error) { this.#finish(error); }
      #finish(error) {
        if (this.#done) return;
        this.#done = true;
        if (this.#id !== null) owner.#nic.tcpClose(this.#id, error !== undefined);
        if (error === undefined) this.#closedResolve(); else this.#closedReject(error);
      }
      /** Closes the connection (FIN) and frees it. */
      async close() {
        await this.opened.catch(() => {});
        this.#finish(undefined);
        await this.closed;
      }
    };

    /**
     * A UDP socket through the tunnel, shaped like Direct Sockets' `UDPSocket`: connected mode
     * (`{ remoteAddress, remotePort }`) or bound mode (`{ localAddress, localPort }`).
     */
    this.UDPSocket = class UDPSocket {
      #id = null;
      #closedResolve;
      #closedReject;
      #done = false;
      constructor(options = {}) {
        this.closed = new Promise((resolve, reject) => {
          this.#closedResolve = resolve;
          this.#closedReject = reject;
        });
        this.closed.catch(() => {});
        this.opened = (async () => {
          const nic = owner.#nic;
          const connected = options.remoteAddress !== undefined;
          if (connected === (options.localAddress !== undefined)) {
            throw new TypeError('UDPSocket needs either remoteAddress/remotePort or localAddress');
          }
          let remoteAddress;
          let remotePort;
          try {
            if (connected) {
              remoteAddress = String(options.remoteAddress);
              remotePort = Number(options.remotePort);
              this.#id = nic.udpConnect(remoteAddress, remotePort);
            } else {
              this.#id = nic.udpBind(String(options.localAddress), Number(options.localPort ?? 0));
            }
          } catch (error) {
            throw domError(error);
          }
          const id = this.#id;
          const [localAddress, localPort] = nic.udpEndpoint(id);
          const socket = this;
          const readable = new ReadableStream(
            {
              // Pulled only when the page reads: unread datagrams wait in the stack's queue
              // (and are dropped there when it is full, as UDP allows).
              async pull(controller) {
                try {
                  const [data, from, fromPort] = await nic.udpRecv(id);
                  controller.enqueue({ data, remoteAddress: from, remotePort: fromPort });
                } catch (error) {
                  if (socket.#done) { controller.close(); return; }
                  const dom = domError(error);
                  controller.error(dom);
                  socket.#finish(dom);
                }
              },
              cancel() {},
            },
            { highWaterMark: 0 },
          );
          const writable = new WritableStream(
            {
              async write(message) {
                const raw = message && message.data !== undefined ? message.data : message;
                const bytes = raw instanceof Uint8Array ? raw
                  : ArrayBuffer.isView(raw) ? new Uint8Array(raw.buffer, raw.byteOffset, raw.byteLength)
                  : new Uint8Array(raw);
                const to = connected ? undefined : message.remoteAddress;
                const toPort = connected ? undefined : message.remotePort;
                if (!connected && (to === undefined || toPort === undefined)) {
                  throw new TypeError('a bound UDPSocket needs remoteAddress and remotePort per message');
                }
                try {
                  await nic.udpSend(id, bytes, to === undefined ? undefined : String(to),
                    toPort === undefined ? undefined : Number(toPort));
                } catch (error) {
                  throw domError(error);
                }
              },
              abort() {},
            },
            { highWaterMark: 1 },
          );
          const opened = { readable, writable, localAddress, localPort };
          if (connected) Object.assign(opened, { remoteAddress, remotePort });
          return opened;
        })().catch((error) => {
          this.#finish(error);
          throw error;
        });
      }
      #finish(error) {
        if (this.#done) return;
        this.#done = true;
        if (this.#id !== null) owner.#nic.udpClose(this.#id);
        if (error === undefined) this.#closedResolve(); else this.#closedReject(error);
      }
      /** Closes the socket; a pending read ends the readable. */
      async close() {
        await this.opened.catch(() => {});
        this.#finish(undefined);
        await this.closed;
      }
    };

    /**
     * A TCP listener on the session's address, shaped like Direct Sockets' `TCPServerSocket`:
     * `opened.readable` yields an opened `TCPSocket` per accepted connection.
     */
    this.TCPServerSocket = class TCPServerSocket {
      #id = null;
      #closedResolve;
      #closedReject;
      #done = false;
      constructor(localAddress, options = {}) {
        this.closed = new Promise((resolve, reject) => {
          this.#closedResolve = resolve;
          this.#closedReject = reject;
        });
        this.closed.catch(() => {});
        this.opened = (async () => {
          const nic = owner.#nic;
          try {
            this.#id = nic.tcpListen(
              String(localAddress ?? ''),
              Number(options.localPort ?? 0),
              Number(options.backlog ?? 0),
            );
          } catch (error) {
            throw domError(error);
          }
          const id = this.#id;
          const localPort = nic.tcpListenerPort(id);
          const server = this;
          const readable = new ReadableStream(
            {
              async pull(controller) {
                let accepted;
                try {
                  accepted = await nic.tcpAccept(id);
                } catch (error) {
                  if (server.#done) { controller.close(); return; }
                  const dom = domError(error);
                  controller.error(dom);
                  server.#finish(dom);
                  return;
                }
                controller.enqueue(new owner.TCPSocket(undefined, undefined, { [ACCEPTED]: accepted }));
              },
              cancel() { server.#finish(undefined); },
            },
            { highWaterMark: 0 },
          );
          return { readable, localAddress: owner.address, localPort };
        })().catch((error) => {
          this.#finish(error);
          throw error;
        });
      }
      #finish(error) {
        if (this.#done) return;
        this.#done = true;
        if (this.#id !== null) owner.#nic.tcpListenerClose(this.#id);
        if (error === undefined) this.#closedResolve(); else this.#closedReject(error);
      }
      /** Stops listening; accepted connections stay open. */
      async close() {
        await this.opened.catch(() => {});
        this.#finish(undefined);
        await this.closed;
      }
    };
  }

  /** Opens a session with the gateway at `url` (`https://host:port/webnic`). */
  static async connect(url, options = {}) {
    await load(options.wasm);
    try {
      return new WebNic(await connectWasm(url, options.serverCertificateHashes));
    } catch (error) {
      throw domError(error);
    }
  }

  /** The session's address (IPv4 when it has one). */
  get address() { return this.#nic.address; }
  /** The session's IPv6 address, or undefined. */
  get addressV6() { return this.#nic.addressV6; }
  /** The link MTU. */
  get mtu() { return this.#nic.mtu; }
  /** Resolves with the reason when the session ends. */
  get closed() { return this.#closed; }
  /** Counters: { packetsSent, packetsReceived, bytesSent, bytesReceived, drops }. */
  stats() { return this.#nic.stats(); }
  /** Ends the session; every socket fails. */
  close() { this.#nic.close(); }

  async #open(socket, host, port, options) {
    const nic = this.#nic;
    const id = await nic.tcpConnect(
      host,
      port,
      options.noDelay !== false,
      options.sendBufferSize ?? 0,
      options.receiveBufferSize ?? 0,
    );
    return this.#streams(socket, id);
  }

  /** The streams of connected socket `id` (opened by the page or accepted by a listener). */
  async #streams(socket, id) {
    const nic = this.#nic;
    socket._setId(id);
    const [remoteAddress, remotePort, localAddress, localPort] = nic.tcpEndpoints(id);
    let readDone = false;
    let writeDone = false;
    const maybeFinish = () => { if (readDone && writeDone) socket._finish(undefined); };
    const readable = new ReadableStream(
      {
        // Pulled only when the page reads (high water mark 0): unread bytes stay in the stack,
        // whose window then shrinks, instead of piling up here.
        async pull(controller) {
          let chunk;
          try {
            chunk = await nic.tcpRead(id, READ_CHUNK);
          } catch (error) {
            const dom = domError(error);
            controller.error(dom);
            socket._finish(dom);
            return;
          }
          if (chunk.length === 0) {
            controller.close();
            readDone = true;
            maybeFinish();
          } else {
            controller.enqueue(chunk);
          }
        },
        cancel() {
          readDone = true;
          maybeFinish();
        },
      },
      { highWaterMark: 0 },
    );
    const writable = new WritableStream(
      {
        // Resolves once the stack took every byte: the page's writer waits while the send
        // buffer is full.
        async write(chunk) {
          const bytes = chunk instanceof Uint8Array ? chunk
            : ArrayBuffer.isView(chunk) ? new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength)
            : new Uint8Array(chunk);
          try {
            await nic.tcpWrite(id, bytes);
          } catch (error) {
            const dom = domError(error);
            socket._finish(dom);
            throw dom;
          }
        },
        close() {
          nic.tcpShutdown(id);
          writeDone = true;
          maybeFinish();
        },
        abort(reason) {
          socket._finish(reason === undefined ? new DOMException('aborted', 'AbortError') : reason);
        },
      },
      { highWaterMark: 1 },
    );
    return { readable, writable, remoteAddress, remotePort, localAddress, localPort };
  }
}

export default WebNic;
