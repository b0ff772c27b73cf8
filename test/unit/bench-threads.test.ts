/** The pod benchmark splits an artifact's CPU by thread (`threadSeconds`): Bun's fetch works on a client thread
 * of its own, so the main thread is not the whole cost. Checked on a real process whose threads burn known
 * amounts of CPU: its main thread, and a worker thread beside it. */
import { type ChildProcess, spawn } from 'node:child_process';
import { afterEach, describe, expect, it } from 'vitest';
import { cpuSeconds, NODE, threadSeconds } from '../../bench/common.ts';

// The main thread burns 0.3 s of its own CPU, a worker 0.6 s of its own (by Node 24's per-thread clock, so a
// machine busy with other tests only makes it take longer); both then stay alive (a thread that ends takes its
// CPU count with it), and the process says when both are done.
const BURN = `
const { Worker } = require('node:worker_threads');
const burn = (ms) => { const t = process.threadCpuUsage(); for (;;) { const u = process.threadCpuUsage(t); if (u.user + u.system >= ms * 1000) break; } };
const w = new Worker(
  "(" + burn + ")(600); require('node:worker_threads').parentPort.postMessage('done'); setInterval(() => {}, 1000);",
  { eval: true },
);
w.once('message', () => { burn(300); console.log('done'); });
setInterval(() => {}, 1000);
`;

let child: ChildProcess | undefined;
afterEach(() => child?.kill('SIGKILL'));

describe('threadSeconds', () => {
  it('puts the main thread’s CPU under main and the others’ under their names, adding up to the process’s', async () => {
    child = spawn(NODE, ['-e', BURN], { stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise<void>((resolve, reject) => {
      child!.stdout!.on('data', (d: Buffer) => d.toString().includes('done') && resolve());
      child!.once('exit', (code) => reject(new Error(`the child exited (${code}) before it was done`)));
    });
    const threads = threadSeconds(child.pid!);
    const others = [...threads].filter(([name]) => name !== 'main').reduce((sum, [, s]) => sum + s, 0);
    expect(threads.get('main')).toBeGreaterThanOrEqual(0.28);
    expect(threads.get('main')).toBeLessThan(0.55); // the worker's 0.6 s is not counted as main's
    expect(others).toBeGreaterThanOrEqual(0.58);
    const all = others + threads.get('main')!;
    expect(Math.abs(all - cpuSeconds(child.pid!))).toBeLessThan(0.05);
  });
});
