/** Memory held per stream is bounded, not by the body's size: 64 apps that stop reading a download after its
 * first bytes, and 64 uploads to an upstream that reads none of them, all open at once, keep each artifact's
 * resident memory within `2 × 64 × PER_STREAM_MIB` of what it held before them. The bodies are 16 MiB, so a
 * stream held whole (2 GiB in all) cannot hide in the kernel's socket buffers (a few MiB a connection on
 * loopback, where a 1 MiB body fits whole). What a stream may hold is the runtime's read-ahead: Node's pipes
 * stop at their high-water marks; Deno's client and server read about 1 MiB ahead; Bun's fetch reads about
 * 2 MiB of a response ahead of its reader and its server about 3 MiB of an upload, which no API of Bun's
 * sets. Raw sockets on both sides, so nothing in the test reads for the ambassador. */
import http from 'node:http';
import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { ARTIFACTS, memoryOf, onStop, runtimeOf, sleep, startAmbassador, stopAfterEach, waitFor } from './helpers.ts';

const STREAMS = 64;
const BODY = 16 * 1024 * 1024;
/** The most a stalled stream may add to the resident memory, by runtime (measured: Node 0.2–1.3, Deno 1–1.6,
 * Bun 1.8–2.3 once settled and up to 4.1 in the first second, the most in a run sharing the machine's two cores:
 * Bun frees what passed through late). */
const PER_STREAM_MIB = { node: 2, deno: 2, bun: 6 } as const;

/** An upstream that sends a 16 MiB body to a GET and never reads a POST's body, nor answers it. */
async function startSlowUpstream() {
  const body = Buffer.alloc(BODY, 'a');
  const held: http.ServerResponse[] = [];
  let uploads = 0;
  const server = http.createServer((req, res) => {
    if (req.method === 'GET') return res.end(body);
    uploads++;
    req.pause(); // the upload is never read
    held.push(res);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  onStop(() =>
    new Promise<void>((r) => {
      server.closeAllConnections();
      server.close(() => r());
    })
  );
  return { url: `http://127.0.0.1:${port}`, uploads: () => uploads };
}

/** A download the app stops reading once its first bytes are in: resolves then, with the socket kept open. */
function slowReader(port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1', () => socket.write('GET /big HTTP/1.1\r\nHost: x\r\n\r\n'));
    socket.once('data', () => {
      socket.pause();
      resolve(socket);
    });
    socket.once('error', reject);
  });
}

/** An upload written whole by the app (the kernel and this process hold what the ambassador has not taken). */
function slowUpload(port: number, body: Buffer): net.Socket {
  const socket = net.connect(port, '127.0.0.1');
  socket.write(`POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: ${BODY}\r\n\r\n`);
  socket.write(body);
  socket.on('error', () => {});
  return socket;
}

describe.each(ARTIFACTS)('memory per stream (%s)', (artifact) => {
  stopAfterEach();

  const bound = 2 * STREAMS * PER_STREAM_MIB[runtimeOf(artifact)];
  it(`holds ${STREAMS} stalled downloads and ${STREAMS} stalled uploads of 16 MiB within ${bound} MiB`, async () => {
    const upstream = await startSlowUpstream();
    const amb = await startAmbassador(artifact, {
      UPSTREAM_URL: upstream.url,
      LOG_LEVEL: 'warn',
      TRY_TIMEOUT_MS: '0',
      REQUEST_TIMEOUT_MS: '0',
      BODY_IDLE_TIMEOUT_MS: '120000',
    });
    // Warm: a few whole downloads and uploads, so what the runtime allocates once is in the idle figure.
    for (let i = 0; i < 4; i++) await (await fetch(`${amb.url}/big`)).arrayBuffer();
    await sleep(500);
    const idle = (await memoryOf(amb.pid)).rssMiB;

    const sockets: net.Socket[] = [];
    onStop(async () => sockets.forEach((s) => s.destroy()));
    sockets.push(...await Promise.all(Array.from({ length: STREAMS }, () => slowReader(amb.port))));
    const upload = Buffer.alloc(BODY, 'b');
    for (let i = 0; i < STREAMS; i++) sockets.push(slowUpload(amb.port, upload));
    await waitFor('every upload at the upstream', async () => upstream.uploads() === STREAMS, 20_000);

    let most = 0;
    for (let i = 0; i < 10; i++) {
      await sleep(300);
      most = Math.max(most, (await memoryOf(amb.pid)).rssMiB);
    }
    console.log(
      `${artifact}: idle ${idle.toFixed(1)} MiB, with ${2 * STREAMS} stalled streams ${most.toFixed(1)} MiB (+${
        (most - idle).toFixed(1)
      })`,
    );
    expect(most - idle).toBeLessThan(bound);
  }, 90_000);
});
