/**
 * Where the ambassador's own CPU goes, as a sum that adds up, on Node or on Bun: the runtime's bare proxy and
 * the ambassador each forward the small body under the same load with the runtime's sampling profiler on, and
 * every sample of the main thread is put in one row — the ambassador's own code, Hono, the server adapter, each
 * part of the runtime's own code, the garbage collector, the native calls — in µs per request. The
 * ambassador's rows less the bare proxy's are the ambassador's own work, row by row, and they sum to the whole
 * difference by construction.
 *
 * On Node (the default) the bare proxy is the bare `node:http` one (bench/bare-node.ts) against the Node bundle,
 * V8's profiler timing each sample; the CPU time the kernel counts for each process in the same run (all its
 * threads, the kernel's share too) is printed beside the sum. On Bun (`--runtime bun`) it is the naive Hono +
 * fetch app (bench/hono-bun.ts) against `bun ambassador.ts`, and JavaScriptCore's profiler, whose samples are
 * not timed while a thread waits for the CPU, gives shares: the kernel's count of the main thread's CPU a
 * request is split by them, and every other thread (Bun's HTTP client thread, where its fetch runs, the JIT and
 * the collector's helpers) is a row of its own by the kernel's count, so the rows sum to all the process's CPU.
 *
 *   npm run bench:profile                      Node, 3 rounds of 5 s each (about a minute)
 *   npm run bench:profile -- --runtime bun     Bun
 *   npm run bench:profile -- --rounds 1 --seconds 3
 *   npm run bench:profile -- --top 40         the 40 functions grown most (25 unless told)
 *   npm run bench:profile -- --log-level info  the ambassador at another LOG_LEVEL than npm run bench's warn
 *
 * The profiler slows both a little (the figures are higher than npm run bench's); the rows are for seeing
 * what to cut, the ratio for judging a cut. wrk and nginx from Debian, pinned as in npm run bench (load and
 * upstream on CPU 0, the proxy on CPU 1); LOG_LEVEL=warn, as npm run bench runs it. Prints a table and
 * writes dist/bench-profile.json (dist/bench-profile-bun.json on Bun).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  ambassadorEnv,
  arg,
  cpuSeconds,
  freePort,
  has,
  NODE,
  pinned,
  root,
  runBenchmark,
  startNginxUpstream,
  textArg,
  threadSeconds,
  waitFor,
  writeFigures,
  wrk,
} from './common.ts';

const ROUNDS = arg('--rounds', 3);
const SECONDS = arg('--seconds', 5);
const TOP = arg('--top', 25);
const LOG_LEVEL = textArg('--log-level', 'warn');
const RUNTIME = textArg('--runtime', 'node');
const BUN = path.join(root, 'node_modules', '.bin', 'bun');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'ambassador-profile-'));
process.on('exit', () => rmSync(tmp, { recursive: true, force: true }));

interface Frame {
  functionName: string;
  url: string;
  lineNumber: number;
}
interface CpuProfile {
  nodes: Array<{ id: number; callFrame: Frame; children?: number[] }>;
  samples: number[];
  timeDeltas: number[];
}

/** The module each line of the bundle comes from, by esbuild's `// path` comments. */
function bundleModules(file: string): Array<{ from: number; module: string }> {
  const out: Array<{ from: number; module: string }> = [];
  readFileSync(file, 'utf8').split('\n').forEach((line, i) => {
    const m = /^\/\/ (node_modules\/(@hono\/node-server|hono)\/|ambassador\.ts)/.exec(line);
    if (m) out.push({ from: i, module: m[2] ?? 'ambassador.ts' });
  });
  return out;
}

/** The row a sample of a function at `url`:`line` (0-based) goes in, on Node. */
function nodeRowOf(frame: Frame, modules: Array<{ from: number; module: string }>): string {
  const { functionName: f, url, lineNumber } = frame;
  if (url.endsWith('ambassador.mjs')) {
    let module = 'ambassador.ts';
    for (const m of modules) if (m.from <= lineNumber) module = m.module;
    return module === 'ambassador.ts'
      ? "the ambassador's own code (ambassador.ts)"
      : module === 'hono'
      ? 'Hono (routing, Context)'
      : 'the server adapter (@hono/node-server)';
  }
  if (url.endsWith('bare-node.mjs')) return "the bare proxy's own code";
  if (f === '(idle)') return 'idle';
  if (f === '(garbage collector)') return 'garbage collection';
  if (f === 'runMicrotasks' || /task_queues|promise/.test(url)) return 'promise turns and ticks';
  if (f === 'writev' || f === 'writeLatin1String' || f === 'writeUtf8String' || f === 'writeBuffer') {
    return 'socket writes (native, the kernel within)';
  }
  if (/timers/.test(url) || ['now', 'getLibuvNow', 'scheduleTimer', 'toggleTimerRef'].includes(f)) return 'timers';
  if (/events|readable|writable|duplex|destroy|end-of-stream|streams/.test(url)) return "Node's events and streams";
  if (/_http_|node:http|node:https|node:net|stream_base|node:internal\/http/.test(url)) {
    return "Node's HTTP and sockets";
  }
  if (url === '' && f.startsWith('RegExp:')) return 'regular expressions (native)';
  if (url === '') return f === '(program)' ? 'V8 and libuv outside JavaScript' : 'other native calls';
  return "Node's other JavaScript";
}

/** Bun's native functions, by the row they go in: the calls a proxy's path makes into the runtime. */
const BUN_NATIVE_ROWS: Record<string, string> = {
  fetch: "Bun's fetch call (the request handed to its client thread)",
  Response: 'Response and body objects (native)',
  clone: 'Response and body objects (native)',
  bytes: 'Response and body objects (native)',
  next: 'header lists iterated (native)',
  entries: 'header lists iterated (native)',
  forEach: 'header lists iterated (native)',
  performIteration: 'header lists iterated (native)',
  requestIP: "the app's address (requestIP)",
  setTimeout: 'timers and the clock (native)',
  clearTimeout: 'timers and the clock (native)',
  setImmediate: 'timers and the clock (native)',
  now: 'timers and the clock (native)',
  AbortController: 'abort signals (native)',
  abort: 'abort signals (native)',
  URL: 'URLs parsed (native)',
  asyncFunctionDrive: 'promise turns (native)',
  performPromiseThen: 'promise turns (native)',
  Promise: 'promise turns (native)',
};

/** The row a sample goes in, on Bun. JavaScriptCore names no function for time outside JavaScript: Bun's server,
 * its event loop and the system calls they make. */
function bunRowOf(frame: Frame): string {
  const { functionName: f, url } = frame;
  if (url.endsWith('/ambassador.ts')) return "the ambassador's own code (ambassador.ts)";
  if (url.endsWith('/hono-bun.ts')) return "the naive app's own code";
  if (url.includes('/node_modules/hono/')) return 'Hono (routing, Context)';
  if (url !== '') return "Bun's own JavaScript (node:, internal:)";
  if (f === '') return "outside JavaScript (Bun's server, its event loop, the kernel)";
  return BUN_NATIVE_ROWS[f] ?? 'other native calls';
}

/** µs per request in each row, and in each function (its own samples, by name, file and line), from the
 * profiles written under `dir`: each sample's time (Node), or its share of `mainUs`, the main thread's CPU a
 * request as the kernel counted it (Bun). */
function rows(
  dir: string,
  requests: number,
  rowOf: (frame: Frame) => string,
  mainUs?: number,
): { rows: Map<string, number>; functions: Map<string, number> } {
  const out = new Map<string, number>();
  const functions = new Map<string, number>();
  for (const file of readdirSync(dir).filter((f) => f.endsWith('.cpuprofile'))) {
    const p = JSON.parse(readFileSync(path.join(dir, file), 'utf8')) as CpuProfile;
    const byId = new Map(p.nodes.map((n) => [n.id, n]));
    p.samples.forEach((id, i) => {
      const frame = byId.get(id)!.callFrame;
      const us = mainUs === undefined ? (p.timeDeltas[i] ?? 0) / requests : mainUs / p.samples.length;
      const row = rowOf(frame);
      out.set(row, (out.get(row) ?? 0) + us);
      const where = frame.url ? ` ${path.basename(frame.url)}:${frame.lineNumber + 1}` : '';
      const name = `${frame.functionName || '(anonymous)'}${where}`;
      functions.set(name, (functions.get(name) ?? 0) + us);
    });
  }
  return { rows: out, functions };
}

/** The threads other than the main one, by the row they go in (Bun's names for them). */
function threadRow(name: string): string {
  if (name === 'HTTP Client') return "Bun's HTTP client thread (its fetch's sockets)";
  if (/^JIT|JSCWarmUp/.test(name)) return 'JavaScriptCore compiling (JIT threads)';
  if (/ollector|Heap Helper|GC/i.test(name)) return 'the garbage collector (its threads)';
  if (name === 'mi-scavenger') return "the allocator's scavenger (mimalloc)";
  if (name === 'thread') return "the profiler's sampling thread (there only while profiling)";
  return 'other threads';
}

/** The two programs profiled, each as argv given its profile's folder and a script that makes SIGTERM an exit
 * (so that the profiler writes its profile). */
interface Subject {
  key: 'bare' | 'amb';
  argv(dir: string, onTerm: string): string[];
}

function subjects(): Subject[] {
  if (RUNTIME === 'bun') {
    const bun = (script: string) => (dir: string, onTerm: string) =>
      pinned(1, [BUN, '--preload', onTerm, '--cpu-prof', '--cpu-prof-interval=100', `--cpu-prof-dir=${dir}`, script]);
    return [
      { key: 'bare', argv: bun(path.join(root, 'bench/hono-bun.ts')) },
      { key: 'amb', argv: bun(path.join(root, 'ambassador.ts')) },
    ];
  }
  const node = (script: string) => (dir: string, onTerm: string) =>
    pinned(1, [NODE, '--import', onTerm, '--cpu-prof', `--cpu-prof-dir=${dir}`, script]);
  return [
    { key: 'bare', argv: node(path.join(root, 'dist/bench/bare-node.mjs')) },
    { key: 'amb', argv: node(path.join(root, 'dist/ambassador.mjs')) },
  ];
}

/** One profiled run on CPU 1: its load, the CPU time a request the kernel counted (all threads, and by thread),
 * and the folder its profile is in. */
async function profiled(subject: Subject, upstream: string) {
  const dir = path.join(tmp, `${subject.key}-${Math.random().toString(36).slice(2)}`);
  const [port, admin] = [await freePort(), await freePort()];
  const onTerm = path.join(tmp, 'exit-on-term.mjs');
  writeFileSync(onTerm, "process.on('SIGTERM', () => process.exit(0));\n");
  const [command, ...args] = subject.argv(dir, onTerm);
  const child: ChildProcess = spawn(command, args, {
    env: { PATH: process.env.PATH ?? '', ...ambassadorEnv(upstream, port, admin), LOG_LEVEL },
    stdio: 'ignore',
  });
  const url = `http://127.0.0.1:${port}/small`;
  await waitFor(url);
  wrk(url, 64, 1); // warm
  const [cpu0, threads0] = [cpuSeconds(child.pid!), threadSeconds(child.pid!)];
  const load = wrk(url, 64, SECONDS);
  const [cpu1, threads1] = [cpuSeconds(child.pid!), threadSeconds(child.pid!)];
  const cpuUs = ((cpu1 - cpu0) * 1e6) / load.total;
  const threadUs = new Map(
    [...threads1].map(([name, s]) => [name, ((s - (threads0.get(name) ?? 0)) * 1e6) / load.total]),
  );
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  await exited;
  return { load, cpuUs, threadUs, dir };
}

async function main(): Promise<void> {
  if (!has('wrk') || !has('nginx')) {
    console.error('\n*** bench:profile needs wrk and nginx (Debian packages wrk, nginx): nothing measured. ***\n');
    process.exit(1);
  }
  if (RUNTIME !== 'node' && RUNTIME !== 'bun') {
    console.error(`\n*** bench:profile: --runtime is node or bun, not ${RUNTIME}. ***\n`);
    process.exit(1);
  }
  const onBun = RUNTIME === 'bun';
  const modules = bundleModules(path.join(root, 'dist/ambassador.mjs'));
  const rowOf = onBun ? bunRowOf : (frame: Frame) => nodeRowOf(frame, modules);
  const { url: upstream, stop: stopUpstream } = await startNginxUpstream(tmp);
  console.log(
    `bench:profile: ${onBun ? `Bun ${BUN}` : `Node ${NODE}`}, ${ROUNDS} round(s) of ${SECONDS} s, 64 connections, ` +
      `the small body, LOG_LEVEL=${LOG_LEVEL}`,
  );

  const sum = { bare: new Map<string, number>(), amb: new Map<string, number>() };
  const functions = { bare: new Map<string, number>(), amb: new Map<string, number>() };
  const totals = { bare: { rps: 0, cpuUs: 0 }, amb: { rps: 0, cpuUs: 0 } };
  const add = (m: Map<string, number>, key: string, us: number) => m.set(key, (m.get(key) ?? 0) + us / ROUNDS);
  for (let round = 0; round < ROUNDS; round++) {
    for (const subject of subjects()) {
      const { key } = subject;
      const run = await profiled(subject, upstream);
      // On Bun the main thread's samples share out its CPU, and every other thread is a row by its own count.
      const found = rows(run.dir, run.load.total, rowOf, onBun ? run.threadUs.get('main') ?? 0 : undefined);
      for (const [row, us] of found.rows) add(sum[key], row, us);
      for (const [name, us] of found.functions) add(functions[key], name, us);
      if (onBun) { for (const [name, us] of run.threadUs) if (name !== 'main') add(sum[key], threadRow(name), us); }
      totals[key].rps += run.load.rps / ROUNDS;
      totals[key].cpuUs += run.cpuUs / ROUNDS;
      console.log(
        `  round ${round + 1}, ${key === 'bare' ? 'bare proxy' : 'ambassador'}: ${run.load.rps.toFixed(0)} req/s, ${
          run.cpuUs.toFixed(1)
        } µs CPU a request`,
      );
    }
  }
  stopUpstream();

  const names = [...new Set([...sum.amb.keys(), ...sum.bare.keys()])]
    .sort((a, b) => (sum.amb.get(b) ?? 0) - (sum.bare.get(b) ?? 0) - ((sum.amb.get(a) ?? 0) - (sum.bare.get(a) ?? 0)));
  const f = (x: number) => x.toFixed(1);
  const busy = (m: Map<string, number>) => [...m].filter(([k]) => k !== 'idle').reduce((n, [, v]) => n + v, 0);
  const where = onBun ? 'main thread by its samples, then the other threads' : 'main thread, sampled';
  console.log(`\n| where (${where}) | bare proxy µs/req | ambassador µs/req | the ambassador's own |`);
  console.log('|---|---|---|---|');
  for (const name of names.filter((n) => n !== 'idle')) {
    const [a, b] = [sum.amb.get(name) ?? 0, sum.bare.get(name) ?? 0];
    console.log(`| ${name} | ${f(b)} | ${f(a)} | ${f(a - b)} |`);
  }
  const [busyA, busyB] = [busy(sum.amb), busy(sum.bare)];
  console.log(`| **sum of the rows** | ${f(busyB)} | ${f(busyA)} | **${f(busyA - busyB)}** |`);
  console.log(
    `| CPU time the kernel counted (every thread, kernel share included) | ${f(totals.bare.cpuUs)} | ${
      f(totals.amb.cpuUs)
    } | ${f(totals.amb.cpuUs - totals.bare.cpuUs)} |`,
  );
  // The functions whose own samples grew the most from the bare proxy to the ambassador: where to look next.
  const grown = [...new Set([...functions.amb.keys(), ...functions.bare.keys()])]
    .map((name) => ({ name, bare: functions.bare.get(name) ?? 0, amb: functions.amb.get(name) ?? 0 }))
    .filter((x) => x.name !== '(idle)')
    .sort((a, b) => b.amb - b.bare - (a.amb - a.bare))
    .slice(0, TOP);
  console.log(`\n| the ${TOP} functions grown most (own samples) | bare proxy µs/req | ambassador µs/req |`);
  console.log('|---|---|---|');
  for (const x of grown) console.log(`| ${x.name} | ${f(x.bare)} | ${f(x.amb)} |`);
  console.log(
    `\nthroughput under the profiler: bare ${totals.bare.rps.toFixed(0)} req/s, ambassador ${
      totals.amb.rps.toFixed(0)
    } (${(totals.amb.rps / totals.bare.rps).toFixed(2)}×)`,
  );
  writeFigures('bench:profile', onBun ? 'bench-profile-bun.json' : 'bench-profile.json', {
    runtime: RUNTIME,
    rounds: ROUNDS,
    seconds: SECONDS,
    rows: Object.fromEntries(names.map((n) => [n, { bare: sum.bare.get(n) ?? 0, ambassador: sum.amb.get(n) ?? 0 }])),
    totals,
  });
}

runBenchmark(main, tmp);
