/**
 * The benchmark: the same work done directly, through nginx, and through each ambassador artifact, in
 * one run, interleaved in rounds (A B C … A B C …) so drift on the machine hits every row alike.
 *
 *   npm run bench                      3 rounds of 5 s per measurement (about 5 minutes)
 *   npm run bench -- --rounds 1 --seconds 2     a quick look
 *
 * Load: wrk (Debian package; autocannon through npx where wrk is missing) with one thread, pinned to
 * CPU 0 with the upstream; the proxy under test pinned to CPU 1. The upstream is nginx serving a fixed small JSON body and a 1 MiB file (a Node
 * upstream when nginx is not installed: the row then says so). Every load is bounded in time; all traffic
 * stays on 127.0.0.1. Prints a table and writes the figures as JSON to dist/bench.json.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import {
  ambassadorEnv,
  arg,
  built,
  cpuSeconds,
  freePort,
  goReference,
  has,
  IMAGE_BUN_ENV,
  IMAGE_NODE_FLAGS,
  type Load,
  memory,
  NODE,
  pinned,
  proxyConfig,
  root,
  runBenchmark,
  sleep,
  SMALL,
  upstreamConfig,
  waitFor,
  writeFigures,
  wrk as wrkLoad,
} from './common.ts';

const ROUNDS = arg('--rounds', 3);
const SECONDS = arg('--seconds', 5);
const tmp = mkdtempSync(path.join(os.tmpdir(), 'ambassador-bench-'));
process.on('exit', () => rmSync(tmp, { recursive: true, force: true })); // its configs and logs go with it

// ---------------------------------------------------------------------------------------------------------
// The upstream: nginx (1 worker) when installed, else node:http.
// ---------------------------------------------------------------------------------------------------------

const ONE_MIB = path.join(tmp, '1mib.bin');
writeFileSync(ONE_MIB, Buffer.alloc(1024 * 1024, 'a'));

interface Running {
  name: string;
  pid: number;
  url: string;
  startupMs: number;
  idleRss: number;
  stop(): Promise<void>;
}

function start(
  name: string,
  argv: string[],
  env: Record<string, string>,
  readyUrl: string,
  url: string,
): Promise<Running> {
  const t0 = performance.now();
  const child: ChildProcess = spawn(argv[0], argv.slice(1), {
    env: { PATH: process.env.PATH ?? '', ...env },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  return waitFor(readyUrl).then(async () => {
    const startupMs = performance.now() - t0;
    await sleep(300);
    return {
      name,
      pid: child.pid!,
      url,
      startupMs,
      idleRss: memory(child.pid!).rss,
      stop: async () => {
        child.kill('SIGTERM');
        await new Promise((r) => child.once('exit', r));
      },
    };
  });
}

async function startUpstream(): Promise<Running> {
  const port = await freePort();
  if (has('nginx')) {
    const conf = upstreamConfig(tmp, port, ONE_MIB);
    return start(
      'upstream (nginx)',
      pinned(0, ['nginx', '-c', conf]),
      {},
      `http://127.0.0.1:${port}/small`,
      `http://127.0.0.1:${port}`,
    );
  }
  const big = readFileSync(ONE_MIB);
  const server = http.createServer((req, res) => (req.url === '/1mib' ? res.end(big) : res.end(SMALL)));
  server.keepAliveTimeout = 60_000;
  await new Promise<void>((r) => server.listen(port, '127.0.0.1', r));
  return {
    name: 'upstream (node:http; nginx not installed)',
    pid: process.pid,
    url: `http://127.0.0.1:${port}`,
    startupMs: 0,
    idleRss: 0,
    stop: async () => void server.close(),
  };
}

// ---------------------------------------------------------------------------------------------------------
// The rows.
// ---------------------------------------------------------------------------------------------------------

interface Row {
  name: string;
  available: string | undefined; // why not, when it cannot run here
  /** the bare proxy on the same runtime this row is measured against */
  baseline?: string;
  start(upstream: string): Promise<Running>;
}

const deno = path.join(root, 'node_modules', '.bin', 'deno');
const ambassadorRow = (
  name: string,
  argv: string[],
  available: string | undefined,
  baseline: string,
  env: Record<string, string> = {},
): Row => ({
  name,
  available,
  baseline,
  async start(upstream) {
    const [port, admin] = [await freePort(), await freePort()];
    return start(
      name,
      pinned(1, argv),
      { ...ambassadorEnv(upstream, port, admin), ...env },
      `http://127.0.0.1:${admin}/readyz`,
      `http://127.0.0.1:${port}`,
    );
  },
});
/** A bare proxy on one runtime, doing nothing but forward: what that runtime costs by itself. */
const bareRow = (name: string, argv: string[], available: string | undefined): Row => ({
  name,
  available,
  async start(upstream) {
    const port = await freePort();
    return start(
      name,
      pinned(1, argv),
      { UPSTREAM_URL: upstream, PORT: String(port) },
      `http://127.0.0.1:${port}/small`,
      `http://127.0.0.1:${port}`,
    );
  },
});
const BARE_NODE = 'bare node:http proxy';
const BARE_DENO = 'bare Deno.serve + fetch';
const BARE_BUN = 'naive Hono + fetch (bun)';
const bunRuntime = path.join(root, 'node_modules', '.bin', 'bun');

const go = goReference();
const rows: Row[] = [
  {
    name: 'direct',
    available: undefined,
    start: async (upstream) => ({
      name: 'direct',
      pid: 0,
      url: upstream,
      startupMs: 0,
      idleRss: 0,
      stop: async () => {},
    }),
  },
  {
    name: 'nginx',
    available: has('nginx') ? undefined : 'not installed',
    async start(upstream) {
      const port = await freePort();
      const conf = proxyConfig(tmp, port, new URL(upstream).host);
      return start(
        'nginx',
        pinned(1, ['nginx', '-c', conf]),
        {},
        `http://127.0.0.1:${port}/small`,
        `http://127.0.0.1:${port}`,
      );
    },
  },
  bareRow("the article's Go ambassador, idle pool raised (reference)", [go.binary], go.why),
  bareRow(
    BARE_NODE,
    [NODE, path.join(root, 'dist/bench/bare-node.mjs')],
    built('dist/bench/bare-node.mjs', 'run npm run build'),
  ),
  bareRow(
    BARE_DENO,
    [deno, 'run', '--quiet', '--allow-net', '--allow-env', path.join(root, 'bench/bare-deno.ts')],
    built('node_modules/.bin/deno', 'npm package deno missing'),
  ),
  bareRow('naive Hono + fetch (deno)', [
    deno,
    'run',
    '--quiet',
    '--allow-net',
    '--allow-env',
    '--allow-read',
    path.join(root, 'bench/hono-deno.ts'),
  ], built('node_modules/.bin/deno', 'npm package deno missing')),
  bareRow(
    BARE_BUN,
    [bunRuntime, path.join(root, 'bench/hono-bun.ts')],
    built('node_modules/.bin/bun', 'npm package bun missing'),
  ),
  ambassadorRow(
    'ambassador (node bundle)',
    [NODE, path.join(root, 'dist/ambassador.mjs')],
    built('dist/ambassador.mjs', 'run npm run build'),
    BARE_NODE,
  ),
  // The V8 flags the ambassador-node and ambassador-sea images run with (Containerfile).
  ambassadorRow(
    'ambassador (node, image flags)',
    [NODE, ...IMAGE_NODE_FLAGS, path.join(root, 'dist/ambassador.mjs')],
    built('dist/ambassador.mjs', 'run npm run build'),
    BARE_NODE,
  ),
  ambassadorRow(
    'ambassador (node SEA)',
    [path.join(root, 'bin/ambassador-node')],
    built('bin/ambassador-node', 'run npm run sea'),
    BARE_NODE,
  ),
  ambassadorRow(
    'ambassador (deno)',
    [deno, 'run', '--quiet', '--allow-net', '--allow-env', '--allow-read', path.join(root, 'ambassador.ts')],
    built('node_modules/.bin/deno', 'npm package deno missing'),
    BARE_DENO,
  ),
  ambassadorRow(
    'ambassador (bun)',
    [bunRuntime, path.join(root, 'ambassador.ts')],
    built('node_modules/.bin/bun', 'npm package bun missing'),
    BARE_BUN,
  ),
  ambassadorRow(
    'ambassador (bun compiled)',
    [path.join(root, 'bin/ambassador-bun')],
    built('bin/ambassador-bun', 'run npm run compile:bun'),
    BARE_BUN,
  ),
  // The settings the ambassador-bun image sets (its JavaScriptCore options and SCHED_POLICY, Containerfile).
  ambassadorRow(
    'ambassador (bun compiled, image env)',
    [path.join(root, 'bin/ambassador-bun')],
    built('bin/ambassador-bun', 'run npm run compile:bun'),
    BARE_BUN,
    IMAGE_BUN_ENV,
  ),
  ambassadorRow(
    'ambassador (deno compiled)',
    [path.join(root, 'bin/ambassador')],
    built('bin/ambassador', 'not built (deno compile needs its denort runtime)'),
    BARE_DENO,
  ),
];

// ---------------------------------------------------------------------------------------------------------
// Load and figures.
// ---------------------------------------------------------------------------------------------------------

interface Scenario {
  name: string;
  path: string;
  connections: number;
}
const scenarios: Scenario[] = [
  { name: 'small, 1 conn', path: '/small', connections: 1 },
  { name: 'small, 64 conns', path: '/small', connections: 64 },
  { name: '1 MiB, 64 conns', path: '/1mib', connections: 64 },
];

interface Sample {
  rps: number;
  p50us: number;
  p99us: number;
  cpuPer10k: number | null;
  errors: number;
}

/** One bounded load: wrk where installed, autocannon (through npx) otherwise. */
function measure(url: string, connections: number, pid: number): Sample {
  const cpu0 = pid ? cpuSeconds(pid) : 0;
  const sample = has('wrk') ? wrk(url, connections) : autocannon(url, connections);
  const cpu = pid ? cpuSeconds(pid) - cpu0 : 0;
  return { ...sample, cpuPer10k: pid ? (cpu / sample.total) * 10_000 : null };
}

function autocannon(url: string, connections: number): Load {
  const out = execFileSync('npx', [
    '--yes',
    'autocannon@8',
    '--json',
    '-c',
    String(connections),
    '-d',
    String(SECONDS),
    url,
  ], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  const r = JSON.parse(out) as {
    requests: { average: number; total: number };
    latency: { p50: number; p99: number };
    non2xx: number;
    errors: number;
  };
  return {
    rps: r.requests.average,
    total: r.requests.total,
    p50us: r.latency.p50 * 1000,
    p99us: r.latency.p99 * 1000,
    errors: r.non2xx + r.errors,
  };
}

function wrk(url: string, connections: number): Load {
  return wrkLoad(url, connections, SECONDS);
}

const median = (xs: number[]) => {
  const s = [...xs].filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  return s.length ? (s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2) : NaN;
};

async function main(): Promise<void> {
  if (!has('wrk')) console.warn('bench: wrk is not installed (Debian package wrk): using autocannon through npx');
  const upstream = await startUpstream();
  const samples = new Map<string, Sample[]>(); // `${row}|${scenario}`
  const life = new Map<string, { startupMs: number[]; idleRss: number[]; peakRss: number[] }>();
  console.log(
    `bench: ${ROUNDS} round(s) × ${SECONDS} s per measurement; upstream: ${upstream.name}; ${os.cpus().length} CPUs (${
      os.cpus()[0]?.model
    })`,
  );
  for (let round = 1; round <= ROUNDS; round++) {
    for (const row of rows) {
      if (row.available) continue;
      const proc = await row.start(upstream.url);
      const l = life.get(row.name) ?? { startupMs: [], idleRss: [], peakRss: [] };
      life.set(row.name, l);
      if (proc.pid) {
        l.startupMs.push(proc.startupMs);
        l.idleRss.push(proc.idleRss);
      }
      for (const sc of scenarios) {
        const key = `${row.name}|${sc.name}`;
        const s = measure(`${proc.url}${sc.path}`, sc.connections, proc.pid);
        samples.set(key, [...(samples.get(key) ?? []), s]);
        process.stdout.write(
          `  round ${round} ${row.name.padEnd(32)} ${sc.name.padEnd(16)} ${s.rps.toFixed(0).padStart(7)} req/s  p50 ${
            s.p50us.toFixed(0)
          } µs  p99 ${s.p99us.toFixed(0)} µs${s.errors ? `  ERRORS ${s.errors}` : ''}\n`,
        );
      }
      if (proc.pid) l.peakRss.push(memory(proc.pid).peak);
      await proc.stop();
    }
  }
  await upstream.stop();

  const fmt = (xs: number[], digits = 0) => {
    const m = median(xs);
    if (!Number.isFinite(m)) return '–';
    return xs.length > 1
      ? `${m.toFixed(digits)} (${Math.min(...xs).toFixed(digits)}–${Math.max(...xs).toFixed(digits)})`
      : m.toFixed(digits);
  };
  const result: Record<string, unknown> = {
    machine: { cpus: os.cpus().length, model: os.cpus()[0]?.model, node: process.version },
    rounds: ROUNDS,
    seconds: SECONDS,
    upstream: upstream.name,
    rows: {},
  };
  const rps = (row: string, sc: string) => median((samples.get(`${row}|${sc}`) ?? []).map((s) => s.rps));
  const p50 = (row: string, sc: string) => median((samples.get(`${row}|${sc}`) ?? []).map((s) => s.p50us));
  console.log(
    '\n| row | small 64c req/s | × nginx | × own bare | p50 / p99 64c (µs) | added p50 1c (µs) | 1 MiB 64c req/s | × nginx | CPU s / 10k req | CPU × own bare | start-up (ms) | idle / peak RSS (MiB) |',
  );
  console.log('|---|---|---|---|---|---|---|---|---|---|---|---|');
  for (const row of rows) {
    if (row.available) {
      console.log(`| ${row.name} | ${row.available} | | | | | | | | | | |`);
      continue;
    }
    const s64 = samples.get(`${row.name}|small, 64 conns`) ?? [];
    const l = life.get(row.name)!;
    const figures = {
      rps64: rps(row.name, 'small, 64 conns'),
      vsNginx: rps(row.name, 'small, 64 conns') / rps('nginx', 'small, 64 conns'),
      vsDirect: rps(row.name, 'small, 64 conns') / rps('direct', 'small, 64 conns'),
      p50us64: median(s64.map((s) => s.p50us)),
      p99us64: median(s64.map((s) => s.p99us)),
      addedP50us1: p50(row.name, 'small, 1 conn') - p50('direct', 'small, 1 conn'),
      rps1mib: rps(row.name, '1 MiB, 64 conns'),
      vsNginx1mib: rps(row.name, '1 MiB, 64 conns') / rps('nginx', '1 MiB, 64 conns'),
      cpuPer10k: median(s64.map((s) => s.cpuPer10k ?? NaN)),
      vsBare: row.baseline ? rps(row.name, 'small, 64 conns') / rps(row.baseline, 'small, 64 conns') : NaN,
      cpuVsBare: row.baseline
        ? median(s64.map((s) => s.cpuPer10k ?? NaN)) /
          median((samples.get(`${row.baseline}|small, 64 conns`) ?? []).map((s) => s.cpuPer10k ?? NaN))
        : NaN,
      startupMs: median(l.startupMs),
      idleRssMiB: median(l.idleRss),
      peakRssMiB: median(l.peakRss),
      errors: [...samples.entries()].filter(([k]) => k.startsWith(`${row.name}|`)).flatMap(([, v]) => v).reduce(
        (a, s) => a + s.errors,
        0,
      ),
    };
    (result.rows as Record<string, unknown>)[row.name] = figures;
    const ratio = (x: number) => (Number.isFinite(x) ? x.toFixed(2) : '–');
    console.log(
      `| ${row.name} | ${fmt(s64.map((s) => s.rps))} | ${figures.vsNginx.toFixed(2)} | ${ratio(figures.vsBare)} | ${
        figures.p50us64.toFixed(0)
      } / ${figures.p99us64.toFixed(0)} | ${row.name === 'direct' ? '–' : figures.addedP50us1.toFixed(0)} | ${
        fmt((samples.get(`${row.name}|1 MiB, 64 conns`) ?? []).map((s) => s.rps))
      } | ${figures.vsNginx1mib.toFixed(2)} | ${ratio(figures.cpuPer10k)} | ${ratio(figures.cpuVsBare)} | ${
        l.startupMs.length ? fmt(l.startupMs) : '–'
      } | ${l.idleRss.length ? `${fmt(l.idleRss)} / ${fmt(l.peakRss)}` : '–'} |`,
    );
  }
  writeFigures('bench', 'bench.json', result);
}

runBenchmark(main, tmp);
