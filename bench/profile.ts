/**
 * Where the ambassador's own CPU goes on Node, as a sum that adds up: the bare `node:http` proxy
 * (bench/bare-node.ts) and the Node bundle each forward the small body under the same load, with V8's
 * sampling profiler on, and every sample of the main thread is put in one row — the ambassador's own code,
 * Hono, the server adapter, each part of Node's own JavaScript, the garbage collector, the native calls that
 * write to sockets — in µs per request. The bundle's rows less the bare proxy's are the ambassador's own
 * work, row by row, and they sum to the whole difference by construction; the CPU time the kernel counts
 * for each process in the same run (all its threads, the kernel's share too) is printed beside them.
 *
 *   npm run bench:profile                      3 rounds of 5 s each (about a minute)
 *   npm run bench:profile -- --rounds 1 --seconds 3
 *   npm run bench:profile -- --top 40         the 40 functions grown most (25 unless told)
 *   npm run bench:profile -- --log-level info  the ambassador at another LOG_LEVEL than npm run bench's warn
 *
 * The profiler slows both a little (the figures are higher than npm run bench's); the rows are for seeing
 * what to cut, the ratio for judging a cut. wrk and nginx from Debian, pinned as in npm run bench (load and
 * upstream on CPU 0, the proxy on CPU 1); LOG_LEVEL=warn, as npm run bench runs it. Prints a table and
 * writes dist/bench-profile.json.
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
  waitFor,
  writeFigures,
  wrk,
} from './common.ts';

const ROUNDS = arg('--rounds', 3);
const SECONDS = arg('--seconds', 5);
const TOP = arg('--top', 25);
const LOG_LEVEL = textArg('--log-level', 'warn');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'ambassador-profile-'));
process.on('exit', () => rmSync(tmp, { recursive: true, force: true }));

interface CpuProfile {
  nodes: Array<
    { id: number; callFrame: { functionName: string; url: string; lineNumber: number }; children?: number[] }
  >;
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

/** The row a sample of a function at `url`:`line` (0-based) goes in. */
function rowOf(
  frame: { functionName: string; url: string; lineNumber: number },
  modules: Array<{ from: number; module: string }>,
): string {
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

/** µs per request in each row, and in each function (its own samples, by name, file and line), from the
 * profiles written under `dir`. */
function rows(
  dir: string,
  requests: number,
  modules: Array<{ from: number; module: string }>,
): { rows: Map<string, number>; functions: Map<string, number> } {
  const out = new Map<string, number>();
  const functions = new Map<string, number>();
  for (const file of readdirSync(dir).filter((f) => f.endsWith('.cpuprofile'))) {
    const p = JSON.parse(readFileSync(path.join(dir, file), 'utf8')) as CpuProfile;
    const byId = new Map(p.nodes.map((n) => [n.id, n]));
    p.samples.forEach((id, i) => {
      const frame = byId.get(id)!.callFrame;
      const us = (p.timeDeltas[i] ?? 0) / requests;
      const row = rowOf(frame, modules);
      out.set(row, (out.get(row) ?? 0) + us);
      const where = frame.url ? ` ${path.basename(frame.url)}:${frame.lineNumber + 1}` : '';
      const name = `${frame.functionName || '(anonymous)'}${where}`;
      functions.set(name, (functions.get(name) ?? 0) + us);
    });
  }
  return { rows: out, functions };
}

/** One profiled run of `script` on CPU 1: the rows, and the CPU time per request the kernel counted. */
async function profiled(script: string, upstream: string, label: string) {
  const dir = path.join(tmp, `${label}-${Math.random().toString(36).slice(2)}`);
  const [port, admin] = [await freePort(), await freePort()];
  // SIGTERM ends the bare proxy too with an exit, so that V8 writes its profile.
  const onTerm = path.join(tmp, 'exit-on-term.mjs');
  writeFileSync(onTerm, "process.on('SIGTERM', () => process.exit(0));\n");
  const child: ChildProcess = spawn(
    pinned(1, [NODE])[0],
    [...pinned(1, [NODE]).slice(1), '--import', onTerm, '--cpu-prof', `--cpu-prof-dir=${dir}`, script],
    { env: { PATH: process.env.PATH ?? '', ...ambassadorEnv(upstream, port, admin), LOG_LEVEL }, stdio: 'ignore' },
  );
  const url = `http://127.0.0.1:${port}/small`;
  await waitFor(url);
  wrk(url, 64, 1); // warm
  const cpu0 = cpuSeconds(child.pid!);
  const load = wrk(url, 64, SECONDS);
  const cpuUs = ((cpuSeconds(child.pid!) - cpu0) * 1e6) / load.total;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  await exited;
  return { load, cpuUs, dir };
}

async function main(): Promise<void> {
  if (!has('wrk') || !has('nginx')) {
    console.error('\n*** bench:profile needs wrk and nginx (Debian packages wrk, nginx): nothing measured. ***\n');
    process.exit(1);
  }
  const bundle = path.join(root, 'dist/ambassador.mjs');
  const bare = path.join(root, 'dist/bench/bare-node.mjs');
  const modules = bundleModules(bundle);
  const { url: upstream, stop: stopUpstream } = await startNginxUpstream(tmp);
  console.log(
    `bench:profile: Node ${NODE}, ${ROUNDS} round(s) of ${SECONDS} s, 64 connections, the small body, LOG_LEVEL=${LOG_LEVEL}`,
  );

  const sum = { bare: new Map<string, number>(), amb: new Map<string, number>() };
  const functions = { bare: new Map<string, number>(), amb: new Map<string, number>() };
  const totals = { bare: { rps: 0, cpuUs: 0 }, amb: { rps: 0, cpuUs: 0 } };
  for (let round = 0; round < ROUNDS; round++) {
    for (const [key, script] of [['bare', bare], ['amb', bundle]] as const) {
      const run = await profiled(script, upstream, key);
      const found = rows(run.dir, run.load.total, modules);
      for (const [row, us] of found.rows) sum[key].set(row, (sum[key].get(row) ?? 0) + us / ROUNDS);
      for (const [name, us] of found.functions) {
        functions[key].set(name, (functions[key].get(name) ?? 0) + us / ROUNDS);
      }
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
  console.log("\n| where (main thread, sampled) | bare proxy µs/req | ambassador µs/req | the ambassador's own |");
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
  writeFigures('bench:profile', 'bench-profile.json', {
    rounds: ROUNDS,
    seconds: SECONDS,
    rows: Object.fromEntries(names.map((n) => [n, { bare: sum.bare.get(n) ?? 0, ambassador: sum.amb.get(n) ?? 0 }])),
    totals,
  });
}

runBenchmark(main, tmp);
