/** Real servers and real processes for the tests: an upstream that records what it received, the
 * ambassador started as a child process (any artifact: `ARTIFACTS`), and a port nothing listens on. */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach } from 'vitest';
import { shippedNode } from '../scripts/node.ts';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const BUNDLE = path.join(ROOT, 'dist', 'ambassador.mjs');
export const DENO = path.join(ROOT, 'node_modules', '.bin', 'deno');
/** The Node the bundle and the demo services run on here: the one the project ships (scripts/node.ts). */
export const NODE = shippedNode(ROOT);

/** How to stop what has been started, newest last. */
const started: Array<() => Promise<void>> = [];

/** Stops, after each test of the calling file, every upstream and process that test started. */
export function stopAfterEach(): void {
  afterEach(async () => {
    for (const stop of started.splice(0).reverse()) await stop();
  });
}

/** Has `stop` run after the test that calls this (in files that call `stopAfterEach`), with the rest. */
export function onStop(stop: () => Promise<void>): void {
  started.push(stop);
}

export interface Seen {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
  rawHeaders: string[];
  body: Buffer;
}

export type UpstreamHandler = (req: http.IncomingMessage, res: http.ServerResponse, seen: Seen, n: number) => void;

export interface Upstream {
  url: string;
  port: number;
  seen: Seen[];
  server: http.Server;
  close(): Promise<void>;
}

/** A node:http upstream on 127.0.0.1:0 that records every request (body included) before handing it on. */
export async function startUpstream(
  handler: UpstreamHandler = (_q, res) => res.end('ok'),
  opts: { readBody?: boolean; port?: number; host?: string } = {},
): Promise<Upstream> {
  const seen: Seen[] = [];
  const server = http.createServer((req, res) => {
    const record: Seen = {
      method: req.method ?? '',
      url: req.url ?? '',
      headers: req.headers,
      rawHeaders: req.rawHeaders,
      body: Buffer.alloc(0),
    };
    seen.push(record);
    const n = seen.length;
    if (opts.readBody === false) return handler(req, res, record, n);
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      record.body = Buffer.concat(chunks);
      handler(req, res, record, n);
    });
  });
  const host = opts.host ?? '127.0.0.1';
  await new Promise<void>((r) => server.listen(opts.port ?? 0, host, r));
  const port = (server.address() as net.AddressInfo).port;
  const close = () =>
    new Promise<void>((r) => {
      server.closeAllConnections();
      server.close(() => r());
    });
  started.push(close);
  return { url: `http://${host}:${port}`, port, seen, server, close };
}

/** A routes file (`{"routes": [...]}`) in a temporary folder of its own, removed after the test (for files
 * that call `stopAfterEach`). */
export function routesFile(routes: unknown[]): string {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ambassador-routes-'));
  const file = path.join(dir, 'routes.json');
  writeFileSync(file, JSON.stringify({ routes }));
  started.push(async () => rmSync(dir, { recursive: true, force: true }));
  return file;
}

/** A suite's name, with why it is skipped when it is: the reason then shows in the run's list of skipped
 * tests (see `test/skipped.ts`), so a green run with skips is visibly not a full run. */
export function skippedBecause(name: string, why: string | undefined): string {
  if (why === undefined) return name;
  // Also said at once, in a banner, so a run watched as it goes shows it before the summary does.
  const banner = `\n*** SKIPPED: ${name.replace(' (%s)', '')} — ${why} ***\n`;
  if (!banners.has(banner)) banners.add(banner), console.warn(banner);
  return `${name} — SKIPPED: ${why}`;
}
const banners = new Set<string>();

/** A GET with node:http (a keep-alive `agent` of the test's own, if given): the status, the body as text and
 * the headers. */
export function get(
  url: string,
  options: { agent?: http.Agent; headers?: Record<string, string> } = {},
): Promise<{ status: number; body: string; headers: http.IncomingHttpHeaders }> {
  return new Promise((resolve, reject) => {
    http.get(url, options, (res) => {
      let body = '';
      res.on('data', (c) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body, headers: res.headers }));
      res.on('error', reject);
    }).on('error', reject);
  });
}

/** The lowest port the kernel hands out for `listen(0)` and outgoing connections. */
const EPHEMERAL_LOW = (() => {
  try {
    return Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]) || 32768;
  } catch {
    return 32768;
  }
})();
/** Each vitest worker (VITEST_POOL_ID, 1 to maxWorkers) takes its ports from a band of its own. */
const BAND = 1500;
const band = EPHEMERAL_LOW - BAND * (1 + ((Number(process.env.VITEST_POOL_ID ?? 1) - 1) % 4));
let nextInBand = Math.floor(Math.random() * BAND);

/** A port on which nothing listens, and on which nothing else in the run will listen unless a test asks it
 * to. It comes from below the kernel's ephemeral range, in this worker's band: every other server in the run
 * listens on port 0 and every outgoing connection takes an ephemeral port, so none can land on it. One taken
 * from `listen(0)` and closed again was handed to another test's server now and then, and a request meant to
 * be refused got that server's answer. Checked free by binding it once. */
export async function deadPort(): Promise<number> {
  for (let tries = 0; tries < BAND; tries++) {
    const port = band + (nextInBand++ % BAND);
    const s = net.createServer();
    const free = await new Promise<boolean>((r) => {
      s.once('error', () => r(false));
      s.listen(port, '127.0.0.1', () => r(true));
    });
    if (free) {
      await new Promise<void>((r) => s.close(() => r()));
      return port;
    }
  }
  throw new Error(`no free port in ${band}-${band + BAND - 1}`);
}

/** Every artifact the behavioural suite runs against: the esbuild bundle under `node`, `ambassador.ts`
 * under Deno and under Bun (from the npm packages `deno` and `bun`), the Node single executable
 * (`npm run sea`) and the Bun compiled binary (`npm run compile:bun`). */
export type Artifact = 'node' | 'deno' | 'sea' | 'bun' | 'bun-bin';
export const ARTIFACTS: Artifact[] = ['node', 'deno', 'sea', 'bun', 'bun-bin'];
export const SEA = path.join(ROOT, 'bin', 'ambassador-node');
export const BUN = path.join(ROOT, 'node_modules', '.bin', 'bun');
export const BUN_BIN = path.join(ROOT, 'bin', 'ambassador-bun');
/** The runtime whose HTTP stack serves the app and reaches the upstream, whichever artifact carries it. */
export const runtimeOf = (
  artifact: Artifact,
): 'node' | 'deno' | 'bun' => (artifact === 'sea' ? 'node' : artifact === 'bun-bin' ? 'bun' : artifact);

/** The fields every request's access line has, in their order (`rejected`, `error` and `closed_by` follow them, in that
 * order, on a line whose request has them). */
export const ACCESS_LINE_KEYS = [
  'time',
  'level',
  'msg',
  'id',
  'route',
  'method',
  'path',
  'status',
  'attempts',
  'endpoint',
  'duration_ms',
  'upstream_ms',
  'bytes_in',
  'bytes_out',
];

export type Program = 'ambassador' | 'order-service' | 'inventory-service';

export function command(artifact: Artifact, file: Program = 'ambassador'): string[] {
  if ((artifact === 'sea' || artifact === 'bun-bin') && file === 'ambassador') {
    const binary = artifact === 'sea' ? SEA : BUN_BIN;
    if (!existsSync(binary)) {
      throw new Error(`${binary} is missing: run \`npm run ${artifact === 'sea' ? 'sea' : 'compile:bun'}\` first`);
    }
    return [binary];
  }
  if (artifact === 'bun' && file === 'ambassador') return [BUN, path.join(ROOT, 'ambassador.ts')];
  if (artifact !== 'deno') { // the demo services run as the Node bundle beside the Node and Bun artifacts
    const bundle = path.join(ROOT, 'dist', file === 'ambassador' ? 'ambassador.mjs' : `services/${file}.mjs`);
    if (!existsSync(bundle)) throw new Error(`${bundle} is missing: run \`npm run build\` first`);
    return [NODE, bundle];
  }
  const source = file === 'ambassador' ? path.join(ROOT, 'ambassador.ts') : path.join(ROOT, 'services', `${file}.ts`);
  return [DENO, 'run', '--quiet', '--allow-net', '--allow-env', '--allow-read', source];
}

export interface Proc {
  child: ChildProcess;
  pid: number;
  lines: string[];
  stderr: string[];
  /** Parsed JSON log lines. */
  logs(): Array<Record<string, unknown>>;
  waitForLine(pred: (line: string) => boolean, timeoutMs?: number): Promise<string>;
  /** Resolves once no line has come for `quietMs`: the lines a request caused are in, whatever order the
   * answer and the log writes took (Deno writes its log asynchronously, after the answer may have left). */
  settled(quietMs?: number): Promise<void>;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  kill(signal?: NodeJS.Signals): void;
}

export function startProcess(argv: string[], env: Record<string, string>, options: { detached?: boolean } = {}): Proc {
  const child = spawn(argv[0], argv.slice(1), {
    env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', DENO_NO_UPDATE_CHECK: '1', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: options.detached ?? false,
  });
  const lines: string[] = [];
  const stderr: string[] = [];
  const waiters: Array<{ pred: (l: string) => boolean; resolve: (l: string) => void }> = [];
  let lastChunkAt = performance.now();
  const feed = (into: string[]) => {
    let buf = '';
    return (chunk: Buffer) => {
      lastChunkAt = performance.now();
      buf += chunk.toString();
      let i: number;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        into.push(line);
        for (const w of [...waiters]) {
          if (w.pred(line)) {
            waiters.splice(waiters.indexOf(w), 1);
            w.resolve(line);
          }
        }
      }
    };
  };
  child.stdout!.on('data', feed(lines));
  child.stderr!.on('data', feed(stderr));
  // 'exit' can come before the last of stdout has been read: `exited` waits for the pipes to close too (all
  // the process wrote is in `lines`), up to a second, for a child of the process that may hold them open.
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.on('exit', (code, signal) => {
      const done = () => resolve({ code, signal });
      child.on('close', done);
      setTimeout(done, 1000).unref();
    });
  });
  return {
    child,
    pid: child.pid!,
    lines,
    stderr,
    logs: () =>
      lines.flatMap((l) => {
        try {
          return [JSON.parse(l) as Record<string, unknown>];
        } catch {
          return [];
        }
      }),
    waitForLine(pred, timeoutMs = 15_000) {
      const found = [...lines, ...stderr].find(pred);
      if (found !== undefined) return Promise.resolve(found);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(
          () =>
            reject(
              new Error(
                `no matching line within ${timeoutMs} ms; stdout:\n${lines.join('\n')}\nstderr:\n${stderr.join('\n')}`,
              ),
            ),
          timeoutMs,
        );
        waiters.push({
          pred,
          resolve: (l) => {
            clearTimeout(timer);
            resolve(l);
          },
        });
        void exited.then(() =>
          setTimeout(() => {
            clearTimeout(timer);
            reject(new Error(`process exited; stdout:\n${lines.join('\n')}\nstderr:\n${stderr.join('\n')}`));
          }, 50)
        );
      });
    },
    async settled(quietMs = 150) {
      for (let quiet = 0; quiet < quietMs; quiet = performance.now() - lastChunkAt) await sleep(quietMs - quiet);
    },
    exited,
    kill: (signal = 'SIGTERM') => {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
    },
  };
}

export interface AmbassadorProc extends Proc {
  url: string;
  adminUrl: string;
  port: number;
  adminPort: number;
  stop(): Promise<void>;
}

export interface ServiceProc extends Proc {
  url: string;
  port: number;
  stop(): Promise<void>;
}

/** Starts a demo service (on PORT=0 unless told) and waits for its `listening` line. `prefix` runs it
 * through another command, such as `ip netns exec NS`. */
export async function startService(
  artifact: Artifact,
  program: Program,
  env: Record<string, string>,
  prefix: string[] = [],
): Promise<ServiceProc> {
  const proc = startProcess([...prefix, ...command(artifact, program)], { PORT: '0', HOST: '127.0.0.1', ...env });
  const line = await proc.waitForLine((l) => l.includes('"msg":"listening"'));
  const { port } = JSON.parse(line) as { port: number };
  const host = env.HOST && env.HOST !== '0.0.0.0' ? env.HOST : '127.0.0.1';
  const stop = async () => {
    proc.kill('SIGKILL');
    await proc.exited;
  };
  started.push(stop);
  return Object.assign(proc, { url: `http://${host}:${port}`, port, stop });
}

/** Starts the ambassador on ephemeral ports and waits for its `listening` line. */
export async function startAmbassador(
  artifact: Artifact,
  env: Record<string, string>,
  prefix: string[] = [],
): Promise<AmbassadorProc> {
  const proc = startProcess([...prefix, ...command(artifact)], {
    PORT: '0',
    ADMIN_PORT: '0',
    ADMIN_HOST: '127.0.0.1',
    RETRY_BACKOFF_MS: '10',
    ...env,
  });
  const line = await proc.waitForLine((l) => l.includes('"msg":"listening"') || / listening /.test(l));
  // JSON, or with LOG_FORMAT=text: `... NOTICE listening version=... port=8080 admin_port=9901 ...`
  const port = Number(/"?port"?[=:](\d+)/.exec(line)?.[1]);
  const adminPort = Number(/"?admin_port"?[=:](\d+)/.exec(line)?.[1]);
  const stop = async () => {
    proc.kill('SIGKILL');
    await proc.exited;
  };
  started.push(stop);
  return Object.assign(proc, {
    url: `http://127.0.0.1:${port}`,
    adminUrl: `http://127.0.0.1:${adminPort}`,
    port,
    adminPort,
    stop,
  });
}

/** A raw HTTP/1.1 exchange over TCP, for requests fetch will not make (absolute-form, smuggling shapes). */
export function rawRequest(port: number, text: string, timeoutMs = 5000): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1');
    let out = '';
    const timer = setTimeout(() => {
      socket.destroy();
      resolve(out);
    }, timeoutMs);
    socket.on('data', (d) => {
      out += d.toString('latin1');
    });
    socket.on('close', () => {
      clearTimeout(timer);
      resolve(out);
    });
    socket.on('error', (e) => {
      clearTimeout(timer);
      if (out) resolve(out);
      else reject(e);
    });
    socket.write(text);
  });
}

/** Peak and current resident memory of a process, in MiB (Linux /proc). */
export async function memoryOf(pid: number): Promise<{ rssMiB: number; peakMiB: number }> {
  const { readFile } = await import('node:fs/promises');
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const kb = (key: string) => Number(new RegExp(`${key}:\\s+(\\d+)`).exec(status)?.[1] ?? NaN);
  return { rssMiB: kb('VmRSS') / 1024, peakMiB: kb('VmHWM') / 1024 };
}

/** Sample values by series, from the Prometheus text format. */
export function parseMetrics(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const at = line.lastIndexOf(' ');
    out.set(line.slice(0, at), Number(line.slice(at + 1)));
  }
  return out;
}

/** The ambassador's metrics now. */
export async function scrape(amb: { adminUrl: string }): Promise<Map<string, number>> {
  return parseMetrics(await (await fetch(`${amb.adminUrl}/metrics`)).text());
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export interface RawRequest {
  /** the request head as received, up to and including the blank line */
  head: string;
  method: string;
  target: string;
  /** header lines as received, [name, value], names as sent */
  headers: Array<[string, string]>;
  body: Buffer;
  /** which connection it came on, from 1 */
  connection: number;
}

export interface RawUpstream {
  url: string;
  port: number;
  /** every byte received, per connection (latin1) */
  received: string[];
  /** the requests parsed from those bytes, in order */
  requests: RawRequest[];
  close(): Promise<void>;
}

/** An upstream over raw TCP that records exactly the bytes it receives and parses them as HTTP/1.1 itself
 * (Content-Length and chunked bodies), so a test sees what went over the wire, not what a server library
 * made of it. `respond` answers each parsed request; by default `200 ok`, kept alive. */
export async function startRawUpstream(
  respond: (req: RawRequest, socket: net.Socket) => void = (_r, s) =>
    void s.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok'),
): Promise<RawUpstream> {
  const received: string[] = [];
  const requests: RawRequest[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    const connection = received.push('');
    let buf = Buffer.alloc(0);
    socket.on('data', (d: Buffer) => {
      received[connection - 1] += d.toString('latin1');
      buf = Buffer.concat([buf, d]);
      for (;;) {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) return;
        const head = buf.subarray(0, end + 4).toString('latin1');
        const [line, ...rest] = head.slice(0, -4).split('\r\n');
        const [method, target] = line.split(' ');
        const headers = rest.map((h) =>
          [h.slice(0, h.indexOf(':')), h.slice(h.indexOf(':') + 1).trim()] as [string, string]
        );
        const value = (name: string) => headers.find(([k]) => k.toLowerCase() === name)?.[1];
        let body: Buffer;
        let used: number;
        if (value('transfer-encoding')?.toLowerCase() === 'chunked') {
          const parts: Buffer[] = [];
          let at = end + 4;
          for (;;) {
            const eol = buf.indexOf('\r\n', at);
            if (eol < 0) return; // wait for more
            const size = parseInt(buf.subarray(at, eol).toString('latin1'), 16);
            if (buf.length < eol + 2 + size + 2) return;
            if (size === 0) {
              used = eol + 4;
              break;
            }
            parts.push(buf.subarray(eol + 2, eol + 2 + size));
            at = eol + 2 + size + 2;
          }
          body = Buffer.concat(parts);
        } else {
          const length = Number(value('content-length') ?? 0);
          if (buf.length < end + 4 + length) return;
          body = Buffer.from(buf.subarray(end + 4, end + 4 + length));
          used = end + 4 + length;
        }
        buf = buf.subarray(used);
        const req = { head, method, target, headers, body, connection };
        requests.push(req);
        respond(req, socket);
      }
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  const close = () =>
    new Promise<void>((r) => {
      for (const s of sockets) s.destroy();
      server.close(() => r());
    });
  started.push(close);
  return { url: `http://127.0.0.1:${port}`, port, received, requests, close };
}

/** Waits until `check` holds, polling; fails with `what` after `timeoutMs`. */
export async function waitFor(
  what: string,
  check: () => boolean | Promise<boolean>,
  timeoutMs = 10_000,
): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > until) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(20);
  }
}

/** `ip …` (iproute2), for tests that make network namespaces of their own. */
export function ip(...args: string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

/** Why network namespaces cannot be made here (not root, no iproute2), or undefined when they can. */
export function namespacesUnavailable(tag: string): string | undefined {
  try {
    ip('netns', 'add', `${tag}-probe`);
    ip('netns', 'del', `${tag}-probe`);
    return undefined;
  } catch (err) {
    return (err as { stderr?: Buffer }).stderr?.toString().trim() || (err as Error).message;
  }
}

/** Connections a server on `port` of this machine still holds open, from the kernel's own tables
 * (/proc/net/tcp and tcp6): ESTABLISHED, and CLOSE_WAIT (the peer has closed, the server has not). */
export function openConnections(port: number): { established: number; closeWait: number } {
  const out = { established: 0, closeWait: 0 };
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let text = '';
    try {
      text = readFileSync(table, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const [, local, , state] = line.trim().split(/\s+/);
      if (!local || parseInt(local.slice(local.lastIndexOf(':') + 1), 16) !== port) continue;
      if (state === '01') out.established++;
      else if (state === '08') out.closeWait++;
    }
  }
  return out;
}

/** Each thread of a process by its name, with its scheduling policy as this host's /proc tells it (0 SCHED_OTHER,
 * 3 SCHED_BATCH); a thread that ends meanwhile is left out. */
export function threadPolicies(pid: number | string): Array<[string, number]> {
  return readdirSync(`/proc/${pid}/task`).flatMap((tid): Array<[string, number]> => {
    try {
      const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // from the third field, the state, on
      return [[readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim(), Number(fields[38])]];
    } catch {
      return [];
    }
  });
}
