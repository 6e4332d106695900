// The dedicated Worker behind `WebNic.connect(url, { worker: true })`: it owns the wasm stack and
// the WebTransport session, so the page's main thread stops being the datagram pump.
//
// Protocol (structured clone, in order): the page posts `{ id, method, args }`; the worker answers
// `{ id, value }` or `{ id, error }` (the error's message, "Name: text" as the wasm side builds it,
// so js/webnic.js maps it to the spec's DOMException names). `id` 0 means "no answer wanted"
// (closes, shutdowns). Unprompted: `{ event: 'stats', stats }` at most every STATS_MS while the
// session lives, and `{ event: 'closed', reason }` once it ends.
//
// UDP (see WorkerNic in webnic.js): `udpSendQueued` sends go through one sequential queue per
// socket, each answered by `{ event: 'udpSent', id, error? }`; `udpReadStart` starts one receive
// loop per socket that posts `{ event: 'udpData', id, value | error }` while it has credit
// (`udpCredit` adds some). One loop and one queue, because the stack keeps one waker per socket
// and direction: overlapping calls would lose wake-ups.
//
// Byte payloads cross as transferred ArrayBuffers: what the stack reads is a fresh copy out of
// wasm memory, so it moves to the page without another copy.
import init, { connect } from '../pkg/webnic_wasm.js';

// How stale `nic.stats()` may be on the page side.
const STATS_MS = 100;

let nic = null;
let statsTimer = null;
// Per UDP socket id: the tail of its send queue, and its receive loop's state.
const udpSends = new Map();
const udpReaders = new Map();

function udpSendQueued(id, bytes, to, toPort) {
  const tail = (udpSends.get(id) ?? Promise.resolve()).then(
    () => nic.udpSend(id, bytes, to, toPort),
  ).then(
    () => postMessage({ event: 'udpSent', id }),
    (error) => postMessage({ event: 'udpSent', id, error: message(error) }),
  );
  udpSends.set(id, tail);
}

async function udpReadLoop(id, credit) {
  const reader = { credit, wake: null, stopped: false };
  udpReaders.set(id, reader);
  while (!reader.stopped) {
    if (reader.credit <= 0) {
      await new Promise((resolve) => { reader.wake = resolve; });
      continue;
    }
    let value;
    try {
      value = await nic.udpRecv(id);
    } catch (error) {
      if (!reader.stopped) postMessage({ event: 'udpData', id, error: message(error) });
      break;
    }
    reader.credit--;
    const [out, transfer] = transferable(value);
    postMessage({ event: 'udpData', id, value: out }, transfer);
  }
  udpReaders.delete(id);
}

function udpCredit(id, n) {
  const reader = udpReaders.get(id);
  if (!reader) return;
  reader.credit += n;
  reader.wake?.();
  reader.wake = null;
}

function udpClose(id) {
  const reader = udpReaders.get(id);
  if (reader) {
    reader.stopped = true;
    reader.wake?.();
  }
  udpSends.delete(id);
  nic.udpClose(id);
}

/** `value` and the buffers to transfer with it (never a view of wasm memory). */
function transferable(value) {
  // A view that does not span its whole buffer (e.g. into wasm memory) is copied first.
  const own = (bytes) => (bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength
    ? bytes : bytes.slice());
  if (value instanceof Uint8Array) {
    const bytes = own(value);
    return [bytes, [bytes.buffer]];
  }
  // udpRecv: [data, remoteAddress, remotePort].
  if (Array.isArray(value) && value[0] instanceof Uint8Array) {
    const bytes = own(value[0]);
    return [[bytes, ...value.slice(1)], [bytes.buffer]];
  }
  return [value, []];
}

function message(error) {
  return String(error && error.message !== undefined ? error.message : error);
}

async function start(url, serverCertificateHashes, wasm, reconnectForMs, linkRepair, linkStream) {
  await init(wasm === undefined ? undefined : { module_or_path: wasm });
  nic = await connect(url, serverCertificateHashes, reconnectForMs, linkRepair, linkStream);
  statsTimer = setInterval(() => postMessage({ event: 'stats', stats: nic.stats() }), STATS_MS);
  nic.closed().then((reason) => {
    clearInterval(statsTimer);
    postMessage({ event: 'stats', stats: nic.stats() });
    postMessage({ event: 'closed', reason });
  });
  return { address: nic.address, addressV6: nic.addressV6, mtu: nic.mtu, stats: nic.stats() };
}

self.onmessage = async ({ data: { id, method, args } }) => {
  try {
    let value;
    if (method === 'connect') {
      value = await start(...args);
    } else if (nic === null) {
      throw new Error('InvalidStateError: not connected');
    } else if (method === 'stats') {
      value = nic.stats();
    } else if (method === 'udpSendQueued') {
      udpSendQueued(...args);
    } else if (method === 'udpReadStart') {
      udpReadLoop(...args);
    } else if (method === 'udpCredit') {
      udpCredit(...args);
    } else if (method === 'udpClose') {
      udpClose(...args);
    } else {
      value = await nic[method](...args);
    }
    if (id === 0) return;
    const [out, transfer] = transferable(value);
    postMessage({ id, value: out }, transfer);
  } catch (error) {
    if (id !== 0) postMessage({ id, error: message(error) });
  }
};
