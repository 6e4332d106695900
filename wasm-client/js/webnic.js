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
// its handle-based calls into the objects of the WICG Direct Sockets spec. The stack runs either
// in this thread (`{ worker: false }`) or in a dedicated Worker (js/webnic-worker.js,
// `{ worker: true }`); the objects below see the same calls either way (every call is awaited,
// so a value and a promise of it both work).
import init, { connect as connectWasm } from '../pkg/webnic_wasm.js';

// Where the stack runs when `connect` is not told: this thread. With the stream link, the stack
// in the page measured faster than in a Worker (headless Chromium, 2 cores, docs/BROWSER.md
// "Window or Worker"): 16 MiB GETs in 8 of 13 benchmark runs, UDP echo in all, and GETs while
// the page's main thread was busy half the time in 7 of 7; the Worker adds a thread and two
// message hops per call and buys nothing on that machine. `worker: true` moves it off the main thread.
const DEFAULT_WORKER = false;

// How long a lost session keeps trying to resume on a new connection (ms): the gateway's
// default grace period. `options.reconnectFor: 0` turns resumption off.
const DEFAULT_RECONNECT_FOR_MS = 60_000;

function reconnectFor(options) {
  const ms = options.reconnectFor ?? DEFAULT_RECONNECT_FOR_MS;
  if (typeof ms !== 'number' || !(ms >= 0)) {
    throw new TypeError(`reconnectFor must be a number of milliseconds >= 0, not ${ms}`);
  }
  return ms;
}

// Link repair (PROTOCOL.md §3.1): the gateway numbers its datagrams and resends the ones the
// page reports missing, so loss on the QUIC hop costs TCP a short delay instead of a loss.
// `options.linkRepair: false` turns it off.
function linkRepair(options) {
  const on = options.linkRepair ?? true;
  if (typeof on !== 'boolean') {
    throw new TypeError(`linkRepair must be a boolean, not ${on}`);
  }
  return on;
}

// Stream link (PROTOCOL.md §3.2): the gateway sends the page's packets on one QUIC stream
// instead of datagrams. A browser reads a stream in chunks of many packets but hands datagrams
// over one read each, so downloads run 2.3× faster (docs/BROWSER.md); the stream is reliable and
// ordered, so a loss on the path holds up every connection of the page until QUIC repairs it
// (as link repair's reordering does, and a WebSocket relay). On by default;
// `options.linkStream: false` gets datagrams (with link repair unless `linkRepair: false`).
function linkStream(options) {
  const on = options.linkStream ?? true;
  if (typeof on !== 'boolean') {
    throw new TypeError(`linkStream must be a boolean, not ${on}`);
  }
  return on;
}

let ready = null;

/** Loads the wasm module once (its URL defaults to next to webnic_wasm.js). */
function load(moduleOrPath) {
  if (!ready) ready = init(moduleOrPath === undefined ? undefined : { module_or_path: moduleOrPath });
  return ready;
}

// Largest chunk one read pulls from the stack: bigger means fewer calls, smaller means the
// window reopens sooner for a slow reader.
const READ_CHUNK = 64 * 1024;

// Datagrams a Worker-mode UDPSocket keeps in flight each way (see WorkerNic.udpSend).
const UDP_PIPELINE = 32;

// Options key under which TCPServerSocket hands an accepted connection's id to TCPSocket.
const ACCEPTED = Symbol('accepted');

/**
 * The page side of a stack running in js/webnic-worker.js: the wasm `Nic`'s calls, each
 * a message to the worker, answered by a promise. Byte payloads cross as transferred
 * ArrayBuffers (a write is copied once first: the page keeps its buffer).
 */
class WorkerNic {
  #worker;
  #next = 1;
  #pending = new Map();
  #closed;
  #stats;

  constructor(worker) {
    this.#worker = worker;
    let closedResolve;
    this.#closed = new Promise((resolve) => { closedResolve = resolve; });
    worker.onmessage = ({ data }) => {
      if (data.event === 'stats') {
        this.#stats = data.stats;
      } else if (data.event === 'udpSent') {
        this.#udpSent(data);
      } else if (data.event === 'udpData') {
        this.#udpData(data);
      } else if (data.event === 'closed') {
        closedResolve(data.reason);
        // Let the worker finish closing its session, then free the thread.
        setTimeout(() => worker.terminate(), 1000);
      } else {
        const call = this.#pending.get(data.id);
        this.#pending.delete(data.id);
        if ('error' in data) call.reject(new Error(data.error)); else call.resolve(data.value);
      }
    };
    worker.onerror = (event) => {
      const error = new Error(`NetworkError: the webnic worker failed: ${event.message}`);
      for (const call of this.#pending.values()) call.reject(error);
      this.#pending.clear();
      closedResolve(error.message);
    };
  }

  /** Starts the worker and its session; resolves once the session is up. */
  static async start(url, options) {
    const worker = new Worker(new URL('./webnic-worker.js', import.meta.url), { type: 'module' });
    const nic = new WorkerNic(worker);
    let wasm = options.wasm;
    // The worker resolves relative URLs against its own location: make them absolute here.
    if (typeof wasm === 'string' || wasm instanceof URL) wasm = new URL(wasm, location.href).href;
    try {
      const info = await nic.#call('connect', [url, options.serverCertificateHashes, wasm, reconnectFor(options), linkRepair(options), linkStream(options)]);
      Object.assign(nic, { address: info.address, addressV6: info.addressV6, mtu: info.mtu });
      nic.#stats = info.stats;
    } catch (error) {
      worker.terminate();
      throw error;
    }
    return nic;
  }

  #call(method, args, transfer = []) {
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject });
      this.#worker.postMessage({ id, method, args }, transfer);
    });
  }

  /** A call whose answer nobody waits for (messages stay in order). */
  #post(method, args) {
    this.#worker.postMessage({ id: 0, method, args });
  }

  stats() { return { ...this.#stats }; }
  closed() { return this.#closed; }
  close() { this.#post('close', []); }
  tcpConnect(...args) { return this.#call('tcpConnect', args); }
  tcpEndpoints(id) { return this.#call('tcpEndpoints', [id]); }
  tcpRead(id, max) { return this.#call('tcpRead', [id, max]); }
  tcpWrite(id, bytes) {
    const copy = bytes.slice();
    return this.#call('tcpWrite', [id, copy], [copy.buffer]);
  }
  tcpShutdown(id) { return this.#call('tcpShutdown', [id]); }
  tcpClose(id, abort) { this.#post('tcpClose', [id, abort]); }
  udpBind(address, port) { return this.#call('udpBind', [address, port]); }
  udpConnect(address, port) { return this.#call('udpConnect', [address, port]); }
  udpEndpoint(id) { return this.#call('udpEndpoint', [id]); }
  // UDP would cost a message round trip per datagram each way; instead the worker runs one
  // sequential send queue and one receive loop per socket (the stack wakes one waiter per
  // socket and direction, so calls must not overlap there), within UDP_PIPELINE datagrams:
  // a send resolves at once while fewer are unconfirmed (a failure rejects a later send), and
  // the worker forwards received datagrams while the page has credit for them.
  udpSend(id, bytes, to, toPort) {
    const state = this.#udp(id);
    if (state.sendError) {
      // Reported once, on the send after the one that failed (UDP: the socket goes on).
      const error = state.sendError;
      state.sendError = null;
      return Promise.reject(error);
    }
    const copy = bytes.slice();
    this.#worker.postMessage({ id: 0, method: 'udpSendQueued', args: [id, copy, to, toPort] }, [copy.buffer]);
    state.unconfirmed++;
    if (state.unconfirmed < UDP_PIPELINE) return Promise.resolve();
    return new Promise((resolve) => state.sendWaiters.push(resolve));
  }
  #udpSent({ id, error }) {
    const state = this.#udpState.get(id);
    if (!state) return;
    state.unconfirmed--;
    if (error !== undefined) state.sendError ??= new Error(error);
    state.sendWaiters.shift()?.();
  }
  udpRecv(id) {
    const state = this.#udp(id);
    if (!state.reading) {
      state.reading = true;
      this.#post('udpReadStart', [id, UDP_PIPELINE]);
    }
    if (state.queue.length > 0) return this.#deliver(id, state.queue.shift());
    if (state.recvError) return Promise.reject(state.recvError);
    return new Promise((resolve, reject) => state.recvWaiters.push({ resolve, reject }));
  }
  #udpData({ id, value, error }) {
    const state = this.#udpState.get(id);
    if (!state) return;
    const item = error === undefined ? { value } : { error: new Error(error) };
    if (item.error) state.recvError = item.error;
    const waiter = state.recvWaiters.shift();
    if (waiter) this.#deliver(id, item).then(waiter.resolve, waiter.reject);
    else state.queue.push(item);
  }
  /** Hands one received item to the page and gives the worker credit for another. */
  #deliver(id, item) {
    if (item.error) return Promise.reject(item.error);
    this.#post('udpCredit', [id, 1]);
    return Promise.resolve(item.value);
  }
  udpClose(id) {
    const state = this.#udpState.get(id);
    this.#udpState.delete(id);
    if (state) {
      const closed = new Error('InvalidStateError: the socket is closed');
      for (const waiter of state.recvWaiters) waiter.reject(closed);
      for (const resolve of state.sendWaiters) resolve();
    }
    this.#post('udpClose', [id]);
  }
  #udpState = new Map();
  #udp(id) {
    let state = this.#udpState.get(id);
    if (!state) {
      state = {
        unconfirmed: 0, sendError: null, sendWaiters: [],
        reading: false, queue: [], recvWaiters: [], recvError: null,
      };
      this.#udpState.set(id, state);
    }
    return state;
  }
  tcpListen(address, port, backlog) { return this.#call('tcpListen', [address, port, backlog]); }
  tcpListenerPort(id) { return this.#call('tcpListenerPort', [id]); }
  tcpAccept(id) { return this.#call('tcpAccept', [id]); }
  tcpListenerClose(id) { this.#post('tcpListenerClose', [id]); }
}

// The gateway's close codes (docs/PROTOCOL.md) as error names, so a page can tell a refused
// token from a busy gateway: `catch (e) { if (e.name === 'TokenExpiredError') ... }`.
const CLOSE_CODE_NAMES = {
  1: 'GatewayShutdownError', 2: 'PoolExhaustedError', 3: 'UnsupportedVersionError',
  4: 'ProtocolViolationError', 5: 'IdleTimeoutError', 6: 'RefusedError',
  7: 'TokenMissingError', 8: 'TokenInvalidError', 9: 'TokenExpiredError',
  10: 'TokenNotYetValidError', 11: 'TooManySessionsPerAddressError',
  12: 'TooManySessionsPerSubjectError', 13: 'TooManySessionsError', 14: 'RateLimitedError',
  15: 'MaxLifetimeError',
};

/** A session the gateway refused or ended: `name` from the close code, `closeCode` its number. */
export class WebNicSessionError extends Error {
  constructor(message, closeCode) {
    super(message);
    this.name = CLOSE_CODE_NAMES[closeCode] ?? 'SessionClosedError';
    this.closeCode = closeCode;
  }
}

/**
 * WebIDL `[EnforceRange] unsigned long` / `unsigned long long` conversion: TypeError for NaN,
 * infinities and values outside [0, max]; fractions truncate.
 */
function enforceRange(value, name, max) {
  const number = Number(value);
  if (!Number.isFinite(number)) throw new TypeError(`${name} is not a finite number`);
  const integer = Math.trunc(number);
  if (integer < 0 || integer > max) throw new TypeError(`${name} is outside [0, ${max}]`);
  return integer;
}

/**
 * `TCPSocketOptions` as the Direct Sockets spec checks them, in the form the stack takes:
 * 0 means "unset" for the sizes and the keep-alive delay, '' for the query type.
 * noDelay defaults to true here (the spec's default is false): tunnelled request/response
 * traffic suffers most from Nagle meeting the peer's delayed ACK (see TcpOptions::no_delay).
 */
function tcpOptions(options) {
  const out = {
    noDelay: options.noDelay === undefined ? true : Boolean(options.noDelay),
    sendBufferSize: 0, receiveBufferSize: 0, keepAliveDelay: 0, dnsQueryType: '',
  };
  for (const name of ['sendBufferSize', 'receiveBufferSize']) {
    if (options[name] === undefined) continue;
    out[name] = enforceRange(options[name], name, 0xffff_ffff);
    if (out[name] === 0) throw new TypeError(`${name} must be greater than 0`);
  }
  if (options.keepAliveDelay !== undefined) {
    out.keepAliveDelay = enforceRange(options.keepAliveDelay, 'keepAliveDelay', Number.MAX_SAFE_INTEGER);
    if (out.keepAliveDelay < 1000) throw new TypeError('keepAliveDelay must be at least 1000 ms');
  }
  if (options.dnsQueryType !== undefined) {
    const type = String(options.dnsQueryType);
    if (type !== 'ipv4' && type !== 'ipv6') {
      throw new TypeError(`dnsQueryType must be "ipv4" or "ipv6", not "${type}"`);
    }
    out.dnsQueryType = type;
  }
  return out;
}

/** Turns the wasm side's "Name: message" errors into DOMExceptions with the spec's names. */
function domError(error) {
  const message = String(error && error.message !== undefined ? error.message : error);
  const closed = /gateway closed the session: .*\(close code (\d+)\)/s.exec(message);
  if (closed) return new WebNicSessionError(message, Number(closed[1]));
  const match = /^(NetworkError|InvalidStateError|NotAllowedError|DataError): (.*)$/s.exec(message);
  if (/^TypeError: /.test(message)) return new TypeError(message.slice('TypeError: '.length));
  return match ? new DOMException(match[2], match[1]) : new DOMException(message, 'NetworkError');
}

export class WebNic {
  #nic;
  #closed;
  #worker;

  constructor(nic, worker) {
    this.#nic = nic;
    this.#worker = worker;
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
        // Bad options throw from the constructor, as WebIDL conversion does in the spec.
        const opening = options[ACCEPTED] !== undefined
          ? owner.#streams(this, options[ACCEPTED])
          : owner.#open(this, String(remoteAddress), Number(remotePort), tcpOptions(options));
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
              this.#id = await nic.udpConnect(remoteAddress, remotePort);
            } else {
              this.#id = await nic.udpBind(String(options.localAddress), Number(options.localPort ?? 0));
            }
          } catch (error) {
            throw domError(error);
          }
          const id = this.#id;
          const [localAddress, localPort] = await nic.udpEndpoint(id);
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
            this.#id = await nic.tcpListen(
              String(localAddress ?? ''),
              Number(options.localPort ?? 0),
              Number(options.backlog ?? 0),
            );
          } catch (error) {
            throw domError(error);
          }
          const id = this.#id;
          const localPort = await nic.tcpListenerPort(id);
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

  /**
   * Opens a session with the gateway at `url` (`https://host:port/webnic`). `options.worker`
   * runs the stack in a dedicated Worker (true) or in this thread (false); where Workers are
   * unavailable (e.g. already inside one) it runs here.
   */
  static async connect(url, options = {}) {
    const worker = (options.worker ?? DEFAULT_WORKER) && typeof Worker !== 'undefined';
    // Browsers send no credentials with WebTransport: the token rides in the query.
    if (options.token !== undefined) {
      const withToken = new URL(url, globalThis.location?.href);
      withToken.searchParams.set('token', options.token);
      url = withToken.href;
    }
    try {
      if (worker) return new WebNic(await WorkerNic.start(url, options), true);
      await load(options.wasm);
      return new WebNic(await connectWasm(url, options.serverCertificateHashes, reconnectFor(options), linkRepair(options), linkStream(options)), false);
    } catch (error) {
      throw domError(error);
    }
  }

  /**
   * Defines `TCPSocket`, `UDPSocket` and `TCPServerSocket` on the global object where the
   * browser has none (Direct Sockets ships only to Isolated Web Apps), so code written against
   * the spec's global names runs unmodified over this session. Returns the names it defined.
   */
  installGlobals(target = globalThis) {
    const defined = [];
    for (const name of ['TCPSocket', 'UDPSocket', 'TCPServerSocket']) {
      if (target[name] === undefined) {
        Object.defineProperty(target, name, { value: this[name], writable: true, configurable: true });
        defined.push(name);
      }
    }
    return defined;
  }

  /** Whether the stack runs in a dedicated Worker. */
  get worker() { return this.#worker; }

  /** The session's address (IPv4 when it has one). */
  get address() { return this.#nic.address; }
  /** The session's IPv6 address, or undefined. */
  get addressV6() { return this.#nic.addressV6; }
  /** The link MTU. */
  get mtu() { return this.#nic.mtu; }
  /** Resolves with the reason when the session ends. */
  get closed() { return this.#closed; }
  /**
   * Counters: { packetsSent, packetsReceived, bytesSent, bytesReceived, drops, reconnects }
   * (`reconnects`: connections the session resumed on after losing one; with a worker, a
   * snapshot at most 100 ms old).
   */
  stats() { return this.#nic.stats(); }
  /** Ends the session; every socket fails. */
  close() { this.#nic.close(); }

  async #open(socket, host, port, options) {
    const nic = this.#nic;
    const id = await nic.tcpConnect(host, port, options);
    return this.#streams(socket, id);
  }

  /** The streams of connected socket `id` (opened by the page or accepted by a listener). */
  async #streams(socket, id) {
    const nic = this.#nic;
    socket._setId(id);
    const [remoteAddress, remotePort, localAddress, localPort] = await nic.tcpEndpoints(id);
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
        async close() {
          await nic.tcpShutdown(id);
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
