/**
 * The pod-budget benchmark: each artifact alone inside a cgroup with the CPU and memory limits of the
 * ambassador container in k8s/ (100m, 128Mi), as the kubelet would run it, with the flags its image uses and
 * the log level the manifests set (none: the default, `info`, an access line a request, to a pipe that a
 * process outside the group reads, as a container runtime does).
 * Per artifact, started cold in a fresh group (its executable a copy out of the page cache, so the code it
 * reads counts against the group, as on a container's first start): a warm-up, then 64 keep-alive
 * connections with the small body, then 64 with 1 MiB bodies; it prints req/s, p50/p99, errors (non-2xx,
 * and answers later than 2 s), the CPU it spent a request (each phase also in windows of 10 s, with the group's
 * anonymous and mapped memory as each window ended, and the small phase thread by thread), whether the kernel
 * OOM-killed it, its own peak resident size and the group's peak (the page cache it read included).
 * nginx and the article's Go ambassador, in the same limits, are the reference rows, a bare node:http
 * proxy with the Node image's flags the baseline of the Node rows, and three of Bun those of the Bun rows: the naive
 * Hono + fetch app, Bun's server with an HTTP/1.1 client of its own (bench/socket-client-bun.ts), and a byte relay
 * with no HTTP, the floor under any proxy on Bun (bench/relay-bun.ts). The rows of the images run again after the
 * rest (`--image-rounds`, 2 unless told), and the image for k8s/ is named only when every round ranks it first:
 * at a tenth of a core one run's weaker phase moves by more than the images differ.
 *
 *   npm run bench:pod                          30 s per phase (about 20 minutes)
 *   npm run bench:pod -- --seconds 10          a quicker look
 *   npm run bench:pod -- --image-rounds 1      the image rows once (they run twice unless told: below)
 *   npm run bench:pod -- --only Deno,nginx     the rows whose name holds one of those texts (commas part them)
 *   npm run bench:pod -- --memory-mib 128      another memory limit than the manifest's
 *   npm run bench:pod -- --only PROCESS --bun-env "BUN_JSC_useFTLJIT=0 PROCESS_MAX_IN_FLIGHT=64"
 *                                              the Bun rows with another environment (here: more places)
 *   npm run bench:pod -- --only MIMALLOC --bun-env "BUN_JSC_useFTLJIT=0 MIMALLOC_PURGE_HOLES=0"
 *                                              or other allocator settings (mimalloc reads MIMALLOC_*)
 *
 * cgroup v2 where the machine has it, else v1 (memory and cpu hierarchies); root is needed to make the
 * groups. Where none can be made it says so and exits 1. The load generator (wrk) and the upstream (nginx)
 * run outside the group on CPU 0; all traffic stays on 127.0.0.1, every load bounded in time.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, realpathSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  cannotMakeGroups,
  coldCopy,
  evict,
  type Group,
  type Limits,
  makeGroup,
  podLimits,
  podLogLevel,
} from './cgroup.ts';
import {
  ambassadorEnv,
  arg,
  built,
  cpuSeconds,
  envArg,
  freePort,
  goReference,
  has,
  IMAGE_BUN_ENV,
  IMAGE_DENO_V8_FLAGS,
  IMAGE_NODE_FLAGS,
  IMAGE_SEA_OPTIONS,
  type Load,
  minorFaults,
  NODE,
  pinned,
  proxyConfig,
  root,
  runBenchmark,
  startNginxUpstream,
  textArg,
  threadSeconds,
  waitFor,
  writeFigures,
  wrk,
} from './common.ts';

const SECONDS = arg('--seconds', 30);
const WARMUP = arg('--warmup', 5);
/** How many times the image rows run, one round after another: k8s/ is told to change only when every round
 * names the same image (see `chooseImage`). */
const IMAGE_ROUNDS = arg('--image-rounds', 2);
/** Another memory limit than the manifest's, to find what an artifact holds: `--memory-mib 128`. */
const MEMORY_MIB = arg('--memory-mib', 0);
/** The group's limits: the manifests', or `--memory-mib`. */
const LIMITS: Limits = { ...podLimits(), ...(MEMORY_MIB ? { memoryBytes: MEMORY_MIB * 1024 ** 2 } : {}) };
const ONLY = textArg('--only');
/** Other V8 flags for the Node image's rows, to choose the image's: `--node-flags "--max-semi-space-size=2"`. */
const NODE_FLAGS = textArg('--node-flags')?.split(/\s+/).filter(Boolean) ?? IMAGE_NODE_FLAGS;
/** Environment for the Bun ambassador rows, to try the settings an image could have (JavaScriptCore options,
 * SCHED_POLICY): `--bun-env "BUN_JSC_useFTLJIT=0"`. */
const BUN_ENV = envArg('--bun-env');
const envText = (env: Record<string, string>) => Object.entries(env).map(([k, v]) => `${k}=${v}`).join(' ');
const BUN_NOTE = Object.keys(BUN_ENV).length > 0 ? `, ${envText(BUN_ENV)}` : '';
const tmp = mkdtempSync(path.join(os.tmpdir(), 'ambassador-pod-'));
process.on('exit', () => rmSync(tmp, { recursive: true, force: true })); // its configs, logs and copies go with it
for (const signal of ['SIGINT', 'SIGTERM'] as const) process.on(signal, () => process.exit(1)); // and when stopped

// ---------------------------------------------------------------------------------------------------------
// The rows and the run.
// ---------------------------------------------------------------------------------------------------------

interface Row {
  name: string;
  /** the image this row runs as its image would, if it is one */
  image?: string;
  available: string | undefined;
  /** its standard error is not shown (the Go reference logs every request a window's end cuts off) */
  quiet?: boolean;
  /** argv and env, given the upstream's URL and the ports to listen on; the URL to wait on */
  command(
    upstream: string,
    port: number,
    admin: number,
  ): { argv: string[]; env: Record<string, string>; ready: string };
}

const deno = path.join(root, 'node_modules', '.bin', 'deno');
const bunRuntime = path.join(root, 'node_modules', '.bin', 'bun');
/** The log level the pod runs the ambassador at (k8s/: the default, `info`, an access line a request), so each
 * row pays for the lines the pod writes (`runRow` drains them). */
const LOG_LEVEL = podLogLevel();
const ambassador =
  (argv: string[], extraEnv: Record<string, string> = {}) => (upstream: string, port: number, admin: number) => ({
    argv,
    ready: `http://127.0.0.1:${admin}/readyz`,
    env: { ...ambassadorEnv(upstream, port, admin), LOG_LEVEL, ...extraEnv },
  });

/** A row of a few lines of Bun (`file`, run from source) that take UPSTREAM_URL and PORT. */
function bunBaseline(name: string, file: string): Row {
  return {
    name,
    available: built('node_modules/.bin/bun', 'npm package bun missing'),
    command: (upstream, port) => ({
      argv: [bunRuntime, path.join(root, file)],
      env: { UPSTREAM_URL: upstream, PORT: String(port) },
      ready: `http://127.0.0.1:${port}/small`,
    }),
  };
}

const go = goReference();
const rows: Row[] = [
  {
    name: "the article's Go ambassador, idle pool raised (reference)",
    available: go.why,
    quiet: true,
    command: (upstream, port) => ({
      argv: [go.binary],
      env: { UPSTREAM_URL: upstream, PORT: String(port) },
      ready: `http://127.0.0.1:${port}/small`,
    }),
  },
  {
    name: 'nginx (1 worker)',
    available: has('nginx') ? undefined : 'not installed',
    command: (upstream, port) => ({
      argv: ['nginx', '-c', proxyConfig(tmp, port, new URL(upstream).host)],
      env: {},
      ready: `http://127.0.0.1:${port}/small`,
    }),
  },
  {
    name: `bare node:http proxy, ${NODE_FLAGS === IMAGE_NODE_FLAGS ? 'image flags' : NODE_FLAGS.join(' ')} (baseline)`,
    available: built('dist/bench/bare-node.mjs', 'run npm run build'),
    command: (upstream, port) => ({
      argv: [NODE, ...NODE_FLAGS, path.join(root, 'dist/bench/bare-node.mjs')],
      env: { UPSTREAM_URL: upstream, PORT: String(port) },
      ready: `http://127.0.0.1:${port}/small`,
    }),
  },
  {
    name: `ambassador, Node bundle, ${
      NODE_FLAGS === IMAGE_NODE_FLAGS ? 'image flags (ambassador:node)' : NODE_FLAGS.join(' ')
    }`,
    image: NODE_FLAGS === IMAGE_NODE_FLAGS ? 'ambassador:node' : undefined,
    available: built('dist/ambassador.mjs', 'run npm run build'),
    command: ambassador([NODE, ...NODE_FLAGS, path.join(root, 'dist/ambassador.mjs')]),
  },
  {
    name: 'ambassador, Node bundle, no flags',
    available: built('dist/ambassador.mjs', 'run npm run build'),
    command: ambassador([NODE, path.join(root, 'dist/ambassador.mjs')]),
  },
  {
    name: 'ambassador, Node single executable (ambassador:sea)',
    image: NODE_FLAGS === IMAGE_NODE_FLAGS ? 'ambassador:sea' : undefined,
    available: built('bin/ambassador-node', 'run npm run sea'),
    command: ambassador([path.join(root, 'bin/ambassador-node')], {
      NODE_OPTIONS: NODE_FLAGS === IMAGE_NODE_FLAGS ? IMAGE_SEA_OPTIONS : NODE_FLAGS.join(' '),
    }),
  },
  bunBaseline('naive Hono + fetch on Bun (baseline)', 'bench/hono-bun.ts'),
  // What an upstream client other than Bun's fetch could give, before any rule.
  bunBaseline('Bun.serve + an HTTP/1.1 client of its own over Bun.connect, no rules', 'bench/socket-client-bun.ts'),
  // Bytes carried and nothing else: below this no proxy on Bun can go.
  bunBaseline("a byte relay on Bun's sockets, no HTTP (the floor)", 'bench/relay-bun.ts'),
  {
    name: `ambassador, Bun compiled binary${BUN_NOTE || `, the image's ${envText(IMAGE_BUN_ENV)} (ambassador:bun)`}`,
    image: BUN_NOTE ? undefined : 'ambassador:bun',
    available: built('bin/ambassador-bun', 'run npm run compile:bun'),
    command: ambassador([path.join(root, 'bin/ambassador-bun')], BUN_NOTE ? BUN_ENV : IMAGE_BUN_ENV),
  },
  {
    name: "ambassador, Bun compiled binary, none of the image's settings",
    available: built('bin/ambassador-bun', 'run npm run compile:bun'),
    command: ambassador([path.join(root, 'bin/ambassador-bun')]),
  },
  {
    name: `ambassador, Bun${BUN_NOTE}`,
    available: built('node_modules/.bin/bun', 'npm package bun missing'),
    command: ambassador([bunRuntime, path.join(root, 'ambassador.ts')], BUN_ENV),
  },
  {
    name: `ambassador, Deno, the image's V8 flags (ambassador:deno)`,
    image: 'ambassador:deno',
    available: built('node_modules/.bin/deno', 'npm package deno missing'),
    // The image is the deno-compiled binary, which cannot be built offline: the same file, run with the flags
    // it is compiled with. Deno may not read its cgroup (README, Limits), so it is given the group's limits as a
    // pod gives them to a Deno sidecar, from its own (the downward API).
    command: ambassador([
      deno,
      'run',
      '--quiet',
      `--v8-flags=${IMAGE_DENO_V8_FLAGS}`,
      '--allow-net',
      '--allow-env',
      '--allow-read',
      path.join(root, 'ambassador.ts'),
    ], { MEMORY_LIMIT_BYTES: String(LIMITS.memoryBytes), CPU_LIMIT_MILLICORES: String(LIMITS.cpuMillis) }),
  },
];

/** One phase's load, and how it went in windows of 10 s: req/s and the CPU the artifact spent a request. */
interface Phase extends Load {
  cpuUsPerRequest: number;
  /** each window's req/s, errors and CPU a request, and the group's memory as it ended (`Group.memoryNow`, MiB):
   * a window that answered nothing with the mapped pages gone is the runtime's code taken back */
  windows: Array<{ rps: number; errors: number; cpuUsPerRequest: number; anonMiB: number; mappedMiB: number }>;
  /** CPU µs a request by thread (`threadSeconds`), over the whole phase */
  threads: Record<string, number>;
  /** minor page faults a request (`minorFaults`), over the whole phase */
  faultsPerRequest: number;
}

interface Result {
  small?: Phase;
  big?: Phase;
  oomKilled: boolean;
  peakMiB: number;
  /** the artifact's own peak resident size (its processes' VmHWM), which the group's peak hides under the cache */
  peakRssMiB: number;
  note?: string;
}

/** CPU µs a request; NaN when nothing was answered. */
const perRequest = (cpuSeconds: number, requests: number) => (requests > 0 ? (cpuSeconds * 1e6) / requests : NaN);
/** A figure for the tables, or a dash where there is none. */
const figure = (x: number) => (Number.isFinite(x) ? x.toFixed(0) : '—');

/** 64 connections for SECONDS, in windows of 10 s, each with the CPU the artifact spent (kernel's count): at a
 * tenth of a core a JIT runtime is still compiling its hot path well into the phase, and the windows show it. */
function phase(url: string, pid: number, group: Group): Phase {
  const windows: Phase['windows'] = [];
  const loads: Load[] = [];
  let cpu = 0;
  const threadsBefore = threadSeconds(pid);
  const faultsBefore = minorFaults(pid);
  for (let left = SECONDS; left > 0; left -= 10) {
    const before = cpuSeconds(pid);
    const load = wrk(url, 64, Math.min(10, left), 2);
    const spent = cpuSeconds(pid) - before;
    cpu += spent;
    loads.push(load);
    const memory = group.memoryNow();
    windows.push({
      rps: load.rps,
      errors: load.errors,
      cpuUsPerRequest: perRequest(spent, load.total),
      anonMiB: memory.anonBytes / 1024 ** 2,
      mappedMiB: memory.mappedBytes / 1024 ** 2,
    });
  }
  const total = loads.reduce((sum, l) => sum + l.total, 0);
  const faults = minorFaults(pid) - faultsBefore;
  // A thread that ended during the phase takes its CPU with it: what is left of it counts as none.
  const threads = Object.fromEntries(
    [...threadSeconds(pid)].map((
      [name, s],
    ) => [name, Math.max(0, perRequest(s - (threadsBefore.get(name) ?? 0), total))]),
  );
  const p50s = loads.map((l) => l.p50us).sort((a, b) => a - b);
  return {
    rps: total / SECONDS,
    total,
    errors: loads.reduce((sum, l) => sum + l.errors, 0),
    p50us: p50s[Math.floor(p50s.length / 2)], // the middle window's
    p99us: Math.max(...loads.map((l) => l.p99us)), // the worst window's
    cpuUsPerRequest: perRequest(cpu, total),
    windows,
    threads,
    faultsPerRequest: total > 0 ? faults / total : NaN,
  };
}

/** Runs one row alone in a fresh group: warm-up, the small body, then 1 MiB bodies. */
async function runRow(row: Row, upstream: string, limits: Limits): Promise<Result> {
  const group = makeGroup(`ambassador-bench-${process.pid}-${rows.indexOf(row)}`, limits);
  const [port, admin] = [await freePort(), await freePort()];
  const { argv: given, env, ready } = row.command(upstream, port, admin);
  // The artifact starts cold, so the pages it reads are charged to its group, as in a pod whose container
  // starts from its image: its executable is a fresh copy out of the page cache, its other files are dropped
  // from it. A binary read before (by the build, a row before, another process running it) would otherwise
  // be charged elsewhere, and a 100 MB runtime looks able to start in less memory than it needs.
  const argv = given[0].startsWith('/') ? [coldCopy(realpathSync(given[0]), tmp), ...given.slice(1)] : given;
  for (const file of argv.slice(1).filter((a) => a.startsWith('/') && existsSync(a))) evict(realpathSync(file));
  // The shell joins the group, then becomes the artifact: everything it starts stays in the group.
  const join = group.procs.map((f) => `echo $$ > ${f}`).join('; ');
  // Its standard output is a pipe read by a process outside the group (with the load generator), as a
  // container's is read by the container runtime: this process waits on wrk and could not read it meanwhile,
  // and an artifact whose pipe is full holds its log lines in memory.
  const drainArgv = pinned(0, ['cat']);
  const drain = spawn(drainArgv[0], drainArgv.slice(1), { stdio: ['pipe', 'ignore', 'ignore'] });
  const child: ChildProcess = spawn('sh', ['-c', `${join}; exec "$@"`, 'sh', ...pinned(1, argv)], {
    env: { PATH: process.env.PATH ?? '', ...env },
    stdio: ['ignore', drain.stdin!, row.quiet ? 'ignore' : 'inherit'],
  });
  drain.stdin!.destroy(); // the artifact holds the pipe's write end now: its exit ends the drain
  let exited = false;
  child.once('exit', () => (exited = true));
  const url = `http://127.0.0.1:${port}`;
  const result: Result = { oomKilled: false, peakMiB: NaN, peakRssMiB: NaN };
  try {
    await waitFor(ready, 30_000);
    wrk(`${url}/small`, 64, WARMUP, 2);
    result.small = phase(`${url}/small`, child.pid!, group);
    if (!exited) result.big = phase(`${url}/1mib`, child.pid!, group);
  } catch (err) {
    result.note = (err as Error).message.split('\n')[0];
  } finally {
    result.oomKilled = group.oomKills() > 0;
    result.peakMiB = group.peakBytes() / 1024 ** 2;
    result.peakRssMiB = group.peakRssBytes() / 1024 ** 2;
    await group.remove();
    drain.kill();
  }
  return result;
}

/** A row's result on one line, as it comes. */
function summary(r: Result): string {
  const line = (l?: Phase) =>
    l
      ? `${l.rps.toFixed(0)} req/s, ${l.errors} errors (by 10 s: ${
        l.windows.map((w) =>
          `${w.rps.toFixed(0)} at ${figure(w.cpuUsPerRequest)} µs, ${figure(w.anonMiB)}+${figure(w.mappedMiB)} MiB`
        ).join('; ')
      })`
      : '—';
  return `small ${line(r.small)}; 1 MiB ${line(r.big)}; ${r.oomKilled ? 'OOM-KILLED' : 'alive'}; peak ${
    figure(r.peakRssMiB)
  } MiB resident, ${r.peakMiB.toFixed(0)} MiB in the group${r.note ? ` (${r.note})` : ''}`;
}

async function main(): Promise<void> {
  const limits = LIMITS;
  const why = await cannotMakeGroups(limits);
  if (why) {
    console.error(`\n*** bench:pod: cannot make a cgroup with the pod's limits here (${why}): nothing measured. ***\n`);
    process.exit(1);
  }
  if (!has('wrk') || !has('nginx')) {
    console.error('\n*** bench:pod needs wrk and nginx (Debian packages wrk, nginx): nothing measured. ***\n');
    process.exit(1);
  }
  const { url: upstream, stop: stopUpstream } = await startNginxUpstream(tmp);
  console.log(
    `bench:pod: limits from k8s/order-service.yaml${
      MEMORY_MIB ? ` (memory: --memory-mib)` : ''
    }: ${limits.cpuMillis}m CPU, ${
      limits.memoryBytes / 1024 ** 2
    } MiB; ${WARMUP} s warm-up, ${SECONDS} s per phase, 64 connections; the ambassador at LOG_LEVEL=${LOG_LEVEL}; ${os.cpus().length} CPUs (${
      os.cpus()[0]?.model
    })`,
  );
  const results: Array<[Row, Result | undefined]> = [];
  for (const row of rows) {
    if (ONLY !== undefined && !ONLY.split(',').some((part) => row.name.includes(part))) continue;
    if (row.available) {
      results.push([row, undefined]);
      continue;
    }
    const r = await runRow(row, upstream, limits);
    results.push([row, r]);
    console.log(`  ${row.name}: ${summary(r)}`);
  }
  // The image rows again, round after round, for `chooseImage`: one round's ranking is not enough.
  const rounds = [results.filter(([row]) => row.image !== undefined)];
  for (let round = 2; round <= IMAGE_ROUNDS && rounds[0].length > 0; round++) {
    console.log(`  the image rows again, round ${round} of ${IMAGE_ROUNDS}:`);
    const again: Array<[Row, Result | undefined]> = [];
    for (const [row, first] of rounds[0]) {
      const r = first ? await runRow(row, upstream, limits) : undefined;
      again.push([row, r]);
      if (r) console.log(`  ${row.name}: ${summary(r)}`);
    }
    rounds.push(again);
  }
  stopUpstream();
  const us = (x?: number) => (x === undefined || !Number.isFinite(x) ? '—' : (x / 1000).toFixed(1));
  console.log(
    '\n| row | small: req/s | p50 / p99 (ms) | errors | CPU µs / req | 1 MiB: req/s | p50 / p99 (ms) | errors | CPU µs / req | OOM-killed | peak resident / group (MiB) |',
  );
  console.log('|---|---|---|---|---|---|---|---|---|---|---|');
  const json: Record<string, unknown> = { limits, seconds: SECONDS, warmup: WARMUP, rows: {} };
  const again = rounds.slice(1).flatMap((round, i) =>
    round.map(([row, r]): [Row, Result | undefined] => [{ ...row, name: `${row.name}, round ${i + 2}` }, r])
  );
  for (const [row, r] of [...results, ...again]) {
    if (!r) {
      console.log(`| ${row.name} | ${row.available ?? 'not run again'} | | | | | | | | | |`);
      continue;
    }
    if (!again.some(([a]) => a === row)) (json.rows as Record<string, unknown>)[row.name] = r;
    const cells = (l?: Phase) =>
      l
        ? [l.rps.toFixed(0), `${us(l.p50us)} / ${us(l.p99us)}`, String(l.errors), figure(l.cpuUsPerRequest)]
        : ['—', '—', '—', '—'];
    console.log(
      `| ${row.name} | ${[...cells(r.small), ...cells(r.big)].join(' | ')} | ${r.oomKilled ? '**yes**' : 'no'} | ${
        figure(r.peakRssMiB)
      } / ${r.peakMiB.toFixed(0)} |`,
    );
  }
  // The small phase window by window: a JIT runtime at a tenth of a core is still compiling for most of it.
  const measured = results.filter((e): e is [Row, Result & { small: Phase }] => e[1]?.small !== undefined);
  const spans = measured[0]?.[1].small.windows.map((_, i) => `${i * 10}–${Math.min(SECONDS, i * 10 + 10)} s`) ?? [];
  console.log(`\nThe small phase by window: req/s (CPU µs a request)\n\n| row | ${spans.join(' | ')} |`);
  console.log(`|---|${spans.map(() => '---|').join('')}`);
  for (const [row, r] of measured) {
    const ws = r.small.windows.map((w) => `${w.rps.toFixed(0)} (${figure(w.cpuUsPerRequest)})`);
    console.log(`| ${row.name} | ${ws.join(' | ')} |`);
  }
  // Where the small phase's CPU went, thread by thread: Bun's fetch runs on a client thread of its own, and a
  // collector or an allocator may work beside the main thread. Threads under 1 µs a request are summed as other.
  console.log(`\nThe small phase's CPU by thread: µs a request\n\n| row | threads |\n|---|---|`);
  for (const [row, r] of measured) {
    const sorted = Object.entries(r.small.threads).filter(([, us]) => Number.isFinite(us)).sort((a, b) => b[1] - a[1]);
    const shown = sorted.filter(([name, us]) => name === 'main' || us >= 1);
    const other = sorted.filter((e) => !shown.includes(e)).reduce((sum, [, us]) => sum + us, 0);
    const cells = [...shown, ...(other > 0 ? [['other', other] as [string, number]] : [])];
    console.log(`| ${row.name} | ${cells.map(([name, us]) => `${name} ${us.toFixed(1)}`).join(', ') || '—'} |`);
  }
  // Page faults: memory a runtime's allocator gave back and then needed again, or never kept, paid for in the
  // kernel on every request; the Bun image's 1 MiB bodies once took 413 a body inside these limits.
  console.log(`\nMinor page faults a request\n\n| row | small | 1 MiB |\n|---|---|---|`);
  for (const [row, r] of [...results, ...again]) {
    if (!r) continue;
    const f = (l?: Phase) => (l && Number.isFinite(l.faultsPerRequest) ? l.faultsPerRequest.toFixed(1) : '—');
    console.log(`| ${row.name} | ${f(r.small)} | ${f(r.big)} |`);
  }
  json.rounds = rounds.slice(1).map((round) => Object.fromEntries(round.map(([row, r]) => [row.name, r ?? null])));
  json.chosen = chooseImage(rounds, limits);
  writeFigures('bench:pod', 'bench-pod.json', json);
}

/** The targets an image is held to inside the manifests' limits (issue figures: the article's Go ambassador). */
const TARGET_SMALL = 1100;
const TARGET_BIG = 150;
/** The image `ambassador:latest` and k8s/ should run: in each round of the image rows, of the images never
 * OOM-killed, the one nearest to both targets, counting only answers without error (the phase furthest from its
 * target decides) — named only when every round ranks the same image first. At a tenth of a core one run's
 * weaker phase (the 1 MiB one, a few per cent of its target) moves between runs by more than the images differ:
 * one run named `ambassador:sea` (8 % against 3 % for `ambassador:bun`), the next, straight after,
 * `ambassador:bun` (17 % against 7 %). Printed beside the image k8s/ runs (scripts/images.ts tags it latest). */
function chooseImage(rounds: Array<Array<[Row, Result | undefined]>>, limits: Limits): string | null {
  const good = (l: Load | undefined) => (l ? Math.max(0, l.rps - l.errors / SECONDS) : 0);
  const score = (r: Result) => Math.min(good(r.small) / TARGET_SMALL, good(r.big) / TARGET_BIG);
  const ranked = rounds.map((round) =>
    round
      .filter((e): e is [Row, Result] => e[0].image !== undefined && e[1] !== undefined && !e[1].oomKilled)
      .sort((a, b) => score(b[1]) - score(a[1]) || good(b[1].small) - good(a[1].small))
  );
  // What k8s/ runs: the ambassador image's tag in its kustomization (scripts/images.ts tags the same one latest).
  const latest = /- name: ambassador\n\s+newName: [^\n]+\n\s+newTag: (\w+)/.exec(
    readFileSync(path.join(root, 'k8s/kustomization.yaml'), 'utf8'),
  )?.[1];
  const firsts = ranked.map((round) => round[0]?.[0].image ?? null);
  const agreed = firsts.every((image) => image !== null && image === firsts[0]) ? firsts[0] : null;
  const noneRan = firsts.every((image) => image === null);
  const rows = ranked.map((round, i) =>
    `\n  round ${i + 1}: ${
      round.map(([row, r]) => `${row.image} ${(100 * score(r)).toFixed(0)}%`).join(', ') ||
      'none (every image row was OOM-killed, failed or was not run)'
    }`
  );
  console.log(
    `\nThe image for k8s/ (${limits.cpuMillis}m, ${limits.memoryBytes / 1024 ** 2} MiB), by the weaker target: ${
      agreed ??
        (noneRan ? 'none' : `no image ranks first in every round (${firsts.map((f) => f ?? 'none').join(', ')})`)
    }${rows.join('')}\nk8s/ runs ambassador:${latest} (k8s/kustomization.yaml)${
      agreed && agreed !== `ambassador:${latest}` ? ' — NOT the one these rounds chose' : ''
    }${agreed === null && !noneRan ? ': the rounds do not agree on another, so there is nothing to change it to' : ''}`,
  );
  return agreed;
}

runBenchmark(main, tmp);
