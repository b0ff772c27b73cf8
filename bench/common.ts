/** What the two benchmarks share: tools on the machine, ports, readiness, process trees and their memory
 * and CPU from /proc, wrk's figures, and nginx configurations. */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { shippedNode } from '../scripts/node.ts';

const here = path.dirname(fileURLToPath(import.meta.url));
/** The repository, from the sources (bench/) or the bundles (dist/bench/). */
export const root = path.resolve(here, path.basename(path.dirname(here)) === 'dist' ? '../..' : '..');

/** A numeric command-line option: `--seconds 10`. */
export const arg = (name: string, fallback: number) => Number(textArg(name, String(fallback)));

/** A command-line option's text: `--log-level info`. */
export function textArg(name: string, fallback: string): string;
export function textArg(name: string): string | undefined;
export function textArg(name: string, fallback?: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

/** A command-line option of environment variables, none when it is absent: `--bun-env "A=1 B=2"`. */
export const envArg = (name: string): Record<string, string> =>
  Object.fromEntries((textArg(name)?.split(/\s+/) ?? []).filter(Boolean).map((kv) => kv.split(/=(.*)/s).slice(0, 2)));

/** undefined when `file` (from the repository root) exists, else how to make it: a row's `available`. */
export const built = (file: string, how: string) => (existsSync(path.join(root, file)) ? undefined : how);

/** The reference row: the article's Go ambassador (bench/go-reference/main.go), built into dist/ with Go
 * from Debian when `go` is there; the binary, or why there is none. */
export function goReference(): { binary: string; why: string | undefined } {
  const binary = path.join(root, 'dist', 'go-reference');
  if (!has('go')) return { binary, why: 'go not installed (Debian package golang-go)' };
  const build = spawnSync('go', ['build', '-o', binary, path.join(root, 'bench', 'go-reference', 'main.go')], {
    encoding: 'utf8',
    env: { ...process.env, GOFLAGS: '-mod=mod', GOTOOLCHAIN: 'local', CGO_ENABLED: '0' },
  });
  return { binary, why: build.status === 0 ? undefined : `go build failed: ${build.stderr.trim().split('\n')[0]}` };
}

/** The Node the images ship (Node 24, scripts/node.ts): every Node row runs on it. */
export const NODE = shippedNode(root);

/** The Containerfile, read once: the images' flags below come from it. */
const CONTAINERFILE = readFileSync(path.join(root, 'Containerfile'), 'utf8');

/** The V8 flags the ambassador-node image runs with, read from the Containerfile's ENTRYPOINT, so the
 * benchmarks measure what the image runs. */
export const IMAGE_NODE_FLAGS =
  (/ENTRYPOINT \["\/nodejs\/bin\/node", ((?:"--[^"]+", )*)"\/app\/ambassador\.mjs"\]/.exec(CONTAINERFILE)?.[1] ?? '')
    .split(', ').filter(Boolean).map((f) => f.replace(/"/g, ''));

/** The NODE_OPTIONS the ambassador-sea image sets (the same flags, less those NODE_OPTIONS does not take). */
export const IMAGE_SEA_OPTIONS = /NODE_OPTIONS='([^']*)'/.exec(CONTAINERFILE)?.[1] ?? '';

/** The settings the ambassador-bun image chose in the pod benchmark (its `BUN_JSC_…` JavaScriptCore options and its
 * SCHED_POLICY, Containerfile), so the benchmarks measure what the image runs: read from that stage only, its
 * comments left out. */
export const IMAGE_BUN_ENV: Record<string, string> = Object.fromEntries(
  Array.from(
    (/AS ambassador-bun\n([\s\S]*?)(?=\nFROM |$)/.exec(CONTAINERFILE)?.[1] ?? '').replace(/^\s*#.*$/gm, '')
      .matchAll(/\b(BUN_JSC_\w+|SCHED_POLICY)=(\S+)/g),
    (m) => [m[1], m[2]],
  ),
);

/** The V8 flags the Deno image's binary is compiled with (deno.json's compile task), as `--v8-flags` takes them. */
export const IMAGE_DENO_V8_FLAGS = /--v8-flags=(\S+)/.exec(readFileSync(path.join(root, 'deno.json'), 'utf8'))?.[1] ??
  '';

export const has = (tool: string) => spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0;
/** argv run on one CPU (the load generator and upstream on 0, the proxy on 1), where taskset exists. */
export const pinned = (
  cpu: number,
  argv: string[],
) => (has('taskset') && os.cpus().length > 1 ? ['taskset', '-c', String(cpu), ...argv] : argv);
export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address() as net.AddressInfo;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

/** Polls `url` until it answers 2xx; how long that took, in ms. */
export async function waitFor(url: string, timeoutMs = 10_000): Promise<number> {
  const t0 = performance.now();
  for (;;) {
    try {
      const res = await fetch(url);
      await res.arrayBuffer();
      if (res.ok) return performance.now() - t0;
    } catch {
      // not yet
    }
    if (performance.now() - t0 > timeoutMs) throw new Error(`${url} not ready after ${timeoutMs} ms`);
    await sleep(2);
  }
}

/** The process and its children (nginx's workers), from /proc. */
export function tree(pid: number): number[] {
  const children = readdirSync('/proc').filter((d) => /^\d+$/.test(d)).flatMap((d) => {
    try {
      return readFileSync(`/proc/${d}/stat`, 'utf8').split(') ')[1].split(' ')[1] === String(pid) ? [Number(d)] : [];
    } catch {
      return [];
    }
  });
  return [pid, ...children.flatMap(tree)];
}

/** Resident memory of a process tree, now and at its peak (summed over the processes), in MiB. */
export function memory(pid: number): { rss: number; peak: number } {
  let rss = 0;
  let peak = 0;
  for (const p of tree(pid)) {
    try {
      const status = readFileSync(`/proc/${p}/status`, 'utf8');
      const kb = (k: string) => Number(new RegExp(`${k}:\\s+(\\d+)`).exec(status)?.[1] ?? 0) / 1024;
      rss += kb('VmRSS');
      peak += kb('VmHWM');
    } catch {
      // gone
    }
  }
  return { rss, peak };
}

/** utime + stime from a `/proc/.../stat` line, in seconds (ticks of 1/100 s); the name in brackets may hold `) `. */
/** The fields of a `/proc/PID/stat` line after the command's name (which may hold spaces): state first. */
function statFields(stat: string): string[] {
  return stat.slice(stat.lastIndexOf(') ') + 2).split(' ');
}

function statCpuSeconds(stat: string): number {
  const fields = statFields(stat);
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** User and system CPU seconds of a process tree, by thread: each process's main thread as `main`, every other
 * thread by its name (`/proc/PID/task/TID/comm`: Bun's `HTTP Client`, JavaScriptCore's `JITWorker`, mimalloc's
 * `mi-scavenger`, Node's `V8Worker`…), threads of one name summed. A runtime whose fetch runs on a thread of its
 * own spends CPU there that its main thread's profile never shows. */
export function threadSeconds(pid: number): Map<string, number> {
  const out = new Map<string, number>();
  for (const p of tree(pid)) {
    let tasks: string[];
    try {
      tasks = readdirSync(`/proc/${p}/task`);
    } catch {
      continue; // gone
    }
    for (const t of tasks) {
      try {
        const seconds = statCpuSeconds(readFileSync(`/proc/${p}/task/${t}/stat`, 'utf8'));
        const name = t === String(p) ? 'main' : readFileSync(`/proc/${p}/task/${t}/comm`, 'utf8').trim();
        out.set(name, (out.get(name) ?? 0) + seconds);
      } catch {
        // the thread ended meanwhile
      }
    }
  }
  return out;
}

/** Minor page faults a process tree has taken, every thread's (`minflt` in `/proc/PID/stat`): memory touched
 * for the first time since the allocator last gave it back, each page zeroed by the kernel and charged to the
 * group. A process held to a tenth of a core can pay more for these than for its work. */
export function minorFaults(pid: number): number {
  return tree(pid).reduce((sum, p) => {
    try {
      return sum + Number(statFields(readFileSync(`/proc/${p}/stat`, 'utf8'))[7]);
    } catch {
      return sum;
    }
  }, 0);
}

/** User and system CPU seconds of a process tree. */
export function cpuSeconds(pid: number): number {
  return tree(pid).reduce((sum, p) => {
    try {
      return sum + statCpuSeconds(readFileSync(`/proc/${p}/stat`, 'utf8'));
    } catch {
      return sum;
    }
  }, 0);
}

export interface Load {
  rps: number;
  total: number;
  p50us: number;
  p99us: number;
  /** non-2xx answers, and connect/read/write errors and timeouts */
  errors: number;
}

function toMicros(v: string): number {
  const m = /^([\d.]+)(us|ms|s)$/.exec(v.trim());
  if (!m) return NaN;
  return Number(m[1]) * (m[2] === 'us' ? 1 : m[2] === 'ms' ? 1000 : 1_000_000);
}

/** One bounded load with wrk (one thread, on CPU 0); an answer later than `timeoutS` counts as an error. */
export function wrk(url: string, connections: number, seconds: number, timeoutS = 5): Load {
  const argv = pinned(0, [
    'wrk',
    '-t1',
    `-c${connections}`,
    `-d${seconds}s`,
    '--latency',
    '--timeout',
    `${timeoutS}s`,
    url,
  ]);
  const out = execFileSync(argv[0], argv.slice(1), { encoding: 'utf8' });
  const socket = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(out)?.slice(1).reduce(
    (a, b) => a + Number(b),
    0,
  ) ?? 0;
  return {
    rps: Number(/Requests\/sec:\s+([\d.]+)/.exec(out)?.[1]),
    total: Number(/(\d+) requests in/.exec(out)?.[1]),
    errors: Number(/Non-2xx or 3xx responses: (\d+)/.exec(out)?.[1] ?? 0) + socket,
    p50us: toMicros(/^\s*50%\s+(\S+)/m.exec(out)?.[1] ?? ''), // a line of its own: the Stdev column ends in % too
    p99us: toMicros(/^\s*99%\s+(\S+)/m.exec(out)?.[1] ?? ''),
  };
}

/** An nginx configuration file in `dir` (one worker, no access log), around the given `http` block body. */
export function nginxConfig(dir: string, port: number, body: string): string {
  const file = path.join(dir, `nginx-${port}.conf`);
  writeFileSync(
    file,
    [
      `worker_processes 1; daemon off; pid ${dir}/nginx-${port}.pid; error_log stderr error;`,
      'events { worker_connections 4096; }',
      'http {',
      `  access_log off; client_body_temp_path ${dir}; proxy_temp_path ${dir}; fastcgi_temp_path ${dir}; uwsgi_temp_path ${dir}; scgi_temp_path ${dir};`,
      '  keepalive_requests 1000000;',
      body,
      '}',
    ].join('\n'),
  );
  return file;
}

/** How both benchmarks run the ambassador: on the given ports, admin on loopback, failures-only logging. */
export const ambassadorEnv = (upstream: string, port: number, admin: number) => ({
  UPSTREAM_URL: upstream,
  PORT: String(port),
  ADMIN_PORT: String(admin),
  ADMIN_HOST: '127.0.0.1',
  LOG_LEVEL: 'warn',
});

export const SMALL = '{"item":"widget","stock":42}';

/** The upstream both benchmarks use: nginx serving the small JSON body at /small and 1 MiB at /1mib. */
export function upstreamConfig(dir: string, port: number, oneMiBFile: string): string {
  return nginxConfig(
    dir,
    port,
    `  server { listen 127.0.0.1:${port}; location = /small { default_type application/json; return 200 '${SMALL}'; } location = /1mib { alias ${oneMiBFile}; } }`,
  );
}

/** That upstream running on CPU 0 (nginx, one worker; the 1 MiB file in `dir`), stopped when the process exits: its
 * URL once it answers, and how to stop it. bench:pod and bench:profile start it so. */
export async function startNginxUpstream(dir: string): Promise<{ url: string; stop(): void }> {
  const oneMiB = path.join(dir, '1mib.bin');
  writeFileSync(oneMiB, Buffer.alloc(1024 * 1024, 'a'));
  const port = await freePort();
  const argv = pinned(0, ['nginx', '-c', upstreamConfig(dir, port, oneMiB)]);
  const proc = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'ignore', 'inherit'] });
  const stop = () => void proc.kill('SIGTERM');
  process.once('exit', stop);
  const url = `http://127.0.0.1:${port}`;
  await waitFor(`${url}/small`);
  return { url, stop };
}

/** nginx as a reverse proxy to `upstreamHost`, with a keep-alive pool and no buffering: the reference. */
export function proxyConfig(dir: string, port: number, upstreamHost: string): string {
  return nginxConfig(
    dir,
    port,
    [
      `  upstream u { server ${upstreamHost}; keepalive 128; }`,
      `  server { listen 127.0.0.1:${port}; location / { proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; } }`,
    ].join('\n'),
  );
}

/** Writes a benchmark's figures to dist/`file` and says so. */
export function writeFigures(label: string, file: string, figures: unknown): void {
  mkdirSync(path.join(root, 'dist'), { recursive: true });
  writeFileSync(path.join(root, 'dist', file), JSON.stringify(figures, null, 2));
  console.log(`\n${label}: figures written to dist/${file}`);
}

/** Runs a benchmark's main, removing its temporary folder however it ends. */
export function runBenchmark(main: () => Promise<void>, tmp: string): void {
  main().then(() => rmSync(tmp, { recursive: true, force: true }), (err) => {
    console.error(err);
    rmSync(tmp, { recursive: true, force: true });
    process.exit(1);
  });
}
