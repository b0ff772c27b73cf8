/** A baseline for the pod benchmark: Bun.serve in front, as the ambassador on Bun, and behind it an HTTP/1.1
 * client of its own over Bun's sockets (`Bun.connect`) in place of Bun's fetch — to measure what such a client
 * could give before any rule is written on top of it. Deliberately no more than the benchmark needs: a body-less
 * request's method, target and headers sent on a kept-alive connection, an answer with a Content-Length read
 * back (anything else is a 502), the body passed to the app piece by piece as it arrives, through one of Bun's
 * direct streams. None of the checks a proxy owes its app is here. UPSTREAM_URL and PORT as the ambassador's.
 * Run with `bun bench/socket-client-bun.ts`. */

interface Socket {
  data: Connection;
  write(bytes: string | Uint8Array): number;
  end(): void;
}
interface Handlers {
  open(s: Socket): void;
  data(s: Socket, bytes: Uint8Array): void;
  close(s: Socket): void;
  error(s: Socket, err: Error): void;
  connectError(s: Socket, err: Error): void;
}
declare const Bun: {
  serve(options: { hostname: string; port: number; fetch: (req: Request) => Response | Promise<Response> }): unknown;
  connect(options: { hostname: string; port: number; data: Connection; socket: Handlers }): Promise<Socket>;
};
declare const process: { env: Record<string, string | undefined> };
/** Bun's direct stream's controller: each write goes to the app's connection, `flush` waits for it to be taken. */
interface Direct {
  write(bytes: Uint8Array): number | Promise<number>;
  flush(): number | Promise<number>;
  close(): void;
}

/** A connection to the upstream, and where what it reads goes now: the answer being read, or nowhere. */
interface Connection {
  socket: Socket | null;
  onData(bytes: Uint8Array): void;
  onClose(): void;
}

const upstream = new URL(process.env.UPSTREAM_URL ?? 'http://127.0.0.1:9000');
const idle: Connection[] = [];
const HEAD_END = new TextEncoder().encode('\r\n\r\n');

function connect(): Promise<Connection> {
  const connection: Connection = { socket: null, onData: () => {}, onClose: () => {} };
  const handlers: Handlers = {
    open: (s) => void (connection.socket = s),
    data: (_s, bytes) => connection.onData(bytes),
    close: () => connection.onClose(),
    error: () => connection.onClose(),
    connectError: () => connection.onClose(),
  };
  return Bun.connect({ hostname: upstream.hostname, port: Number(upstream.port), data: connection, socket: handlers })
    .then(() => connection);
}

/** Reads one answer off `connection`: its head, then a direct stream of its Content-Length bytes. */
function answer(connection: Connection): Promise<Response> {
  return new Promise((resolve, reject) => {
    let head: Uint8Array | null = new Uint8Array(0);
    let left = 0;
    const pieces: Uint8Array[] = [];
    let wake: (() => void) | null = null;
    let closed = false;
    connection.onClose = () => {
      closed = true;
      wake?.();
      reject(new Error('the upstream closed the connection'));
    };
    const stream = (c: Direct) => async () => {
      for (;;) {
        while (pieces.length > 0) await c.write(pieces.shift()!);
        if (left === 0 || closed) break;
        await c.flush();
        if (pieces.length === 0) await new Promise<void>((r) => (wake = r));
        wake = null;
      }
      c.close();
      if (left !== 0 || closed) return;
      connection.onClose = () => void idle.splice(idle.indexOf(connection) >>> 0, 1);
      idle.push(connection);
    };
    connection.onData = (bytes) => {
      if (head === null) {
        left -= bytes.byteLength;
        pieces.push(bytes);
        return void wake?.();
      }
      const joined = new Uint8Array(head.byteLength + bytes.byteLength);
      joined.set(head);
      joined.set(bytes, head.byteLength);
      const at = indexOf(joined, HEAD_END);
      if (at < 0) return void (head = joined);
      head = null;
      const [statusLine, ...fields] = new TextDecoder('latin1').decode(joined.subarray(0, at)).split('\r\n');
      const headers: Array<[string, string]> = fields.map((f) => {
        const colon = f.indexOf(':');
        return [f.slice(0, colon).trim().toLowerCase(), f.slice(colon + 1).trim()];
      });
      const length = headers.find(([name]) => name === 'content-length');
      if (!length) return void (connection.socket?.end(), resolve(new Response(null, { status: 502 })));
      left = Number(length[1]);
      const body = new ReadableStream({ type: 'direct', pull: (c: Direct) => stream(c)() } as never);
      resolve(new Response(body, { status: Number(statusLine.split(' ')[1]), headers }));
      if (at + HEAD_END.byteLength < joined.byteLength) connection.onData(joined.subarray(at + HEAD_END.byteLength));
    };
  });
}

function indexOf(bytes: Uint8Array, part: Uint8Array): number {
  outer: for (let i = 0; i + part.byteLength <= bytes.byteLength; i++) {
    for (let j = 0; j < part.byteLength; j++) if (bytes[i + j] !== part[j]) continue outer;
    return i;
  }
  return -1;
}

Bun.serve({
  hostname: '127.0.0.1',
  port: Number(process.env.PORT ?? 8080),
  async fetch(req) {
    const url = new URL(req.url);
    const connection = idle.pop() ?? await connect();
    let head = `${req.method} ${url.pathname}${url.search} HTTP/1.1\r\nhost: ${upstream.host}\r\n`;
    req.headers.forEach((value, name) => void (name !== 'host' && (head += `${name}: ${value}\r\n`)));
    connection.socket!.write(head + '\r\n');
    return answer(connection);
  },
});

export {}; // a module: its declarations are its own
