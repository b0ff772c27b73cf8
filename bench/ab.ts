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
 *   npm run bench:ab -- --pod bin/ambassador-bun /tmp/after-bun       each in a group of its own with the pod's limits
 *   npm run bench:ab -- --pod bin/ambassador-bun bin/ambassador-bun --env-a "SCHED_POLICY=normal"   a setting, not a file
 *   npm run bench:ab -- --deno before.ts ambassador.ts     two .ts files on Deno, not Bun (in the checkout, where hono resolves)
 *
 * A file ending in .mjs or .js runs on the project's Node 24, one ending in .ts on Bun (`bun FILE`; on Deno with
 * `--deno`), anything else as an executable (a compiled binary). wrk and nginx from Debian. Prints each window and the medians, and writes
 * dist/bench-ab.json.
 *
 * `--pod` judges a change where the pod's figures are made: each build runs in a cgroup of its own with the CPU
 * and memory limits of the ambassador container in k8s/ (as `npm run bench:pod` makes them), under 64 connections
 * (the pod benchmark's), at the manifests' log level unless `--log-level` says otherwise, with the images' settings:
 * a bundle with the Node image's V8 flags, and a Bun build (a .ts file, a compiled binary) with the Bun image's. The
 * two groups each take a tenth of CPU 1, so they do not compete; the machine's moods still reach both alike. Root is
 * needed to make the groups.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { cannotMakeGroups, type Group, makeGroup, podLimits, podLogLevel } from './cgroup.ts';
import {
  ambassadorEnv,
  arg,
  cpuSeconds,
  envArg,
  freePort,
  IMAGE_BUN_ENV,
  IMAGE_NODE_FLAGS,
  NODE,
  pinned,
  root,
  runBenchmark,
  startNginxUpstream,
  textArg,
  waitFor,
  writeFigures,
} from './common.ts';

const POD = process.argv.includes('--pod');
/** .ts builds run on Deno (`deno run`, as `npm run bench` runs it) rather than on Bun. */
const DENO = process.argv.includes('--deno');
const WINDOWS = arg('--windows', 20);
const SECONDS = arg('--seconds', 3);
const LOG_LEVEL = textArg('--log-level', POD ? podLogLevel() : 'warn');
const CONNECTIONS = POD ? 64 : 32;
/** More environment for one build, to compare a setting rather than a file: `--env-a "SCHED_POLICY=normal"`. */
const EXTRA_ENV = [envArg('--env-a'), envArg('--env-b')];
const builds = process.argv.slice(2).filter((a, i, all) =>
  !a.startsWith('--') && !(all[i - 1]?.startsWith('--') && all[i - 1] !== '--pod' && all[i - 1] !== '--deno')
);
const tmp = mkdtempSync(path.join(os.tmpdir(), 'ambassador-ab-'));

interface Build {
  name: string;
  child: ChildProcess;
  group?: Group;
  url: string;
  us: number[];
  rps: number[];
}

function argvOf(file: string): string[] {
  if (/\.(mjs|js)$/.test(file)) return POD ? [NODE, ...IMAGE_NODE_FLAGS, file] : [NODE, file];
  if (file.endsWith('.ts') && DENO) {
    return [
      path.join(root, 'node_modules', '.bin', 'deno'),
      'run',
      '--quiet',
      '--allow-net',
      '--allow-env',
      '--allow-read',
      file,
    ];
  }
  if (file.endsWith('.ts')) return [path.join(root, 'node_modules', '.bin', 'bun'), file];
  return [file];
}

/** Whether a build runs on Bun: a .ts file, or a binary `bun build --compile` made (Bun names its repository in it). */
const onBun = (file: string) =>
  (file.endsWith('.ts') && !DENO) || (!/\.(mjs|js)$/.test(file) && readFileSync(file).includes('oven-sh/bun'));

/** Requests wrk completed against `url` in `seconds` (one thread, CONNECTIONS connections, on CPU 0). */
function load(url: string, seconds: number): Promise<number> {
  const argv = pinned(0, ['wrk', '-t1', `-c${CONNECTIONS}`, `-d${seconds}s`, url]);
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
  const limits = POD ? podLimits() : undefined;
  if (limits) {
    const why = await cannotMakeGroups(limits);
    if (why) {
      console.error(`bench:ab: --pod needs cgroups, and none can be made here: ${why}`);
      process.exit(1);
    }
  }
  const upstream = await startNginxUpstream(tmp);
  const running: Build[] = [];
  for (const [i, file] of builds.entries()) {
    const port = await freePort();
    const argv = pinned(1, argvOf(path.resolve(file)));
    const env = {
      PATH: process.env.PATH ?? '',
      ...ambassadorEnv(upstream.url, port, await freePort()),
      LOG_LEVEL,
      ...(POD && onBun(file) ? IMAGE_BUN_ENV : {}),
      ...EXTRA_ENV[i],
    };
    // In a group, a shell joins it and then becomes the build, so everything the build starts stays in it.
    const group = limits ? makeGroup(`ambassador-ab-${process.pid}-${i}`, limits) : undefined;
    const join = group?.procs.map((f) => `echo $$ > ${f}`).join('; ');
    const child = join
      ? spawn('sh', ['-c', `${join}; exec "$@"`, 'sh', ...argv], { env, stdio: ['ignore', 'ignore', 'inherit'] })
      : spawn(argv[0], argv.slice(1), { env, stdio: ['ignore', 'ignore', 'inherit'] });
    process.once('exit', () => child.kill('SIGTERM'));
    const extra = Object.entries(EXTRA_ENV[i]).map(([k, v]) => ` ${k}=${v}`).join('');
    running.push({
      name: `${'AB'[i]} ${file}${extra}`,
      child,
      group,
      url: `http://127.0.0.1:${port}/small`,
      us: [],
      rps: [],
    });
  }
  for (const b of running) await waitFor(b.url, 30_000);
  console.log(
    `bench:ab: ${WINDOWS} windows of ${SECONDS} s, both on CPU 1 at once, ${CONNECTIONS} connections each, ` +
      `LOG_LEVEL=${LOG_LEVEL}` +
      (limits ? `, each in a group of ${limits.cpuMillis}m and ${limits.memoryBytes / 1024 ** 2} MiB` : ''),
  );
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
  for (const b of running) await b.group?.remove();
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
    connections: CONNECTIONS,
    pod: limits ?? null,
    builds: running.map((b) => ({ file: b.name.slice(2), us: b.us, rps: b.rps })),
    ratios,
  });
}

runBenchmark(main, tmp);
