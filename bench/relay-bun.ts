/** The floor for the pod benchmark: a byte relay on Bun's own sockets, no HTTP at all. Each connection the load
 * opens gets one of its own to the upstream, and whatever either side sends is written to the other as it comes
 * (what a socket will not take yet waits for its drain, with no bound: the load reads as it comes). No request is read, no rule applied: what a JavaScript
 * runtime spends just carrying the bytes, which any HTTP proxy on it spends too. UPSTREAM_URL and PORT as the
 * ambassador's. Run with `bun bench/relay-bun.ts`. */

interface Socket {
  data: Side;
  write(bytes: Uint8Array): number;
  end(): void;
}
interface Handlers {
  open?(s: Socket): void;
  data(s: Socket, bytes: Uint8Array): void;
  drain(s: Socket): void;
  close(s: Socket): void;
  error(s: Socket): void;
  connectError?(s: Socket): void;
}
declare const Bun: {
  listen(options: { hostname: string; port: number; socket: Handlers }): unknown;
  connect(options: { hostname: string; port: number; data: Side; socket: Handlers }): Promise<Socket>;
};
declare const process: { env: Record<string, string | undefined> };

/** One end of a relayed pair: its peer, once connected (what the app sends before that waits in `early`),
 * and what it has not yet taken. */
interface Side {
  peer: Socket | null;
  early: Uint8Array[];
  pending: Uint8Array[];
}

const upstream = new URL(process.env.UPSTREAM_URL ?? 'http://127.0.0.1:9000');

/** Writes to `to`, after whatever it has not taken yet. */
function send(to: Socket, bytes: Uint8Array): void {
  if (to.data.pending.length > 0) return void to.data.pending.push(bytes);
  const n = to.write(bytes);
  if (n < bytes.byteLength) to.data.pending.push(bytes.subarray(n));
}

/** Both ends alike: what one sends goes to the other, and when one closes so does the other. */
const close = (s: Socket) => s.data.peer?.end();
const relay: Handlers = {
  data: (s, bytes) => (s.data.peer ? send(s.data.peer, bytes) : s.data.early.push(bytes.slice())),
  drain(s) {
    const { pending } = s.data;
    while (pending.length > 0) {
      const n = s.write(pending[0]);
      if (n < pending[0].byteLength) return void (pending[0] = pending[0].subarray(n));
      pending.shift();
    }
  },
  close,
  error: close,
};

Bun.listen({
  hostname: '127.0.0.1',
  port: Number(process.env.PORT ?? 8080),
  socket: {
    ...relay,
    async open(app) {
      app.data = { peer: null, early: [], pending: [] };
      const to = await Bun.connect({
        hostname: upstream.hostname,
        port: Number(upstream.port),
        data: { peer: app, early: [], pending: [] },
        socket: { ...relay, connectError: () => app.end() },
      });
      app.data.peer = to;
      for (const bytes of app.data.early.splice(0)) send(to, bytes);
    },
  },
});

export {}; // a module: its declarations are its own
