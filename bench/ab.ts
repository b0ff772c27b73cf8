/**
 * Two builds of the ambassador compared on a noisy machine: both run at once, pinned to the same core, each under
 * its own wrk (32 connections each, the small body, on the other core with the upstream), in windows. Each window
 * gives each build's CPU per request and the ratio of the two; whatever the machine does during a window it does to
 * both, so the median ratio settles differences of a few per cent that runs one after the other cannot (those drift
 * by a fifth between hours here). Run a build against itself first to see the floor: two copies of one bundle have
 * differed by 2 % at the median and by up to 6 % in a window.
 *
 *   npm run bench:ab -- /tmp/before.mjs dist/ambassador.mjs          20 windows of 3 s, LOG_LEVEL=warn
 *   npm run bench:ab -- /tmp/before.mjs dist/ambassador.mjs --windows 10 --seconds 2 --log-level info
 *   npm run bench:ab -- dist/ambassador.mjs dist/ambassador.mjs       the same build twice: the noise floor
 *
 * A file ending in .mjs or .js runs on the project's Node 24, one ending in .ts on Bun (`bun FILE`), anything else
 * as an executable (a compiled binary). wrk and nginx from Debian. Prints each window and the medians, and writes
 * dist/bench-ab.json.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  ambassadorEnv,
  arg,
  cpuSeconds,
  freePort,
  NODE,
  pinned,
  root,
  runBenchmark,
  startNginxUpstream,
  textArg,
  waitFor,
  writeFigures,
} from './common.ts';

const WINDOWS = arg('--windows', 20);
const SECONDS = arg('--seconds', 3);
const LOG_LEVEL = textArg('--log-level', 'warn');
const builds = process.argv.slice(2).filter((a, i, all) => !a.startsWith('--') && !all[i - 1]?.startsWith('--'));
const tmp = mkdtempSync(path.join(os.tmpdir(), 'ambassador-ab-'));

interface Build {
  name: string;
  child: ChildProcess;
  url: string;
  us: number[];
  rps: number[];
}

function argvOf(file: string): string[] {
  if (/\.(mjs|js)$/.test(file)) return [NODE, file];
  if (file.endsWith('.ts')) return [path.join(root, 'node_modules', '.bin', 'bun'), file];
  return [file];
}

/** Requests wrk completed against `url` in `seconds` (one thread, 32 connections, on CPU 0). */
function load(url: string, seconds: number): Promise<number> {
  const argv = pinned(0, ['wrk', '-t1', '-c32', `-d${seconds}s`, url]);
  return new Promise((resolve, reject) =>
    execFile(argv[0], argv.slice(1), (err, out) => {
      if (err) return reject(err);
      resolve(Number(/(\d+) requests in/.exec(out)?.[1] ?? NaN));
    })
  );
}

const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)];

async function main(): Promise<void> {
  if (builds.length !== 2) {
    console.error('bench:ab: give two builds, e.g. npm run bench:ab -- /tmp/before.mjs dist/ambassador.mjs');
    process.exit(1);
  }
  const upstream = await startNginxUpstream(tmp);
  const running: Build[] = [];
  for (const [i, file] of builds.entries()) {
    const port = await freePort();
    const argv = pinned(1, argvOf(path.resolve(file)));
    const child = spawn(argv[0], argv.slice(1), {
      env: { PATH: process.env.PATH ?? '', ...ambassadorEnv(upstream.url, port, await freePort()), LOG_LEVEL },
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    process.once('exit', () => child.kill('SIGTERM'));
    running.push({ name: `${'AB'[i]} ${file}`, child, url: `http://127.0.0.1:${port}/small`, us: [], rps: [] });
  }
  for (const b of running) await waitFor(b.url, 30_000);
  console.log(`bench:ab: ${WINDOWS} windows of ${SECONDS} s, both on CPU 1 at once, LOG_LEVEL=${LOG_LEVEL}`);
  await Promise.all(running.map((b) => load(b.url, 2))); // warm-up
  const ratios: number[] = [];
  for (let w = 1; w <= WINDOWS; w++) {
    const before = running.map((b) => cpuSeconds(b.child.pid!));
    const done = await Promise.all(running.map((b) => load(b.url, SECONDS)));
    running.forEach((b, i) => {
      b.us.push(((cpuSeconds(b.child.pid!) - before[i]) / done[i]) * 1e6);
      b.rps.push(done[i] / SECONDS);
    });
    ratios.push(running[1].us.at(-1)! / running[0].us.at(-1)!);
    console.log(
      `  window ${w}: ${
        running.map((b) => `${b.rps.at(-1)!.toFixed(0)} req/s ${b.us.at(-1)!.toFixed(1)} µs`).join(' | ')
      }` +
        `  B/A ${ratios.at(-1)!.toFixed(3)}`,
    );
  }
  for (const b of running) b.child.kill('SIGTERM');
  upstream.stop();
  for (const b of running) {
    console.log(
      `${b.name}: ${median(b.us).toFixed(1)} µs of CPU a request, ${median(b.rps).toFixed(0)} req/s (medians)`,
    );
  }
  console.log(
    `B/A, CPU a request: ${median(ratios).toFixed(3)} at the median (${Math.min(...ratios).toFixed(3)}–${
      Math.max(...ratios).toFixed(3)
    }); below 1 in ${ratios.filter((r) => r < 1).length} of ${ratios.length} windows`,
  );
  writeFigures('bench:ab', 'bench-ab.json', {
    windows: WINDOWS,
    seconds: SECONDS,
    logLevel: LOG_LEVEL,
    builds: running.map((b) => ({ file: b.name.slice(2), us: b.us, rps: b.rps })),
    ratios,
  });
}

runBenchmark(main, tmp);
