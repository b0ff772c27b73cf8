/** `npm start`'s runner: the four processes come up, the chain answers through one ambassador in front
 * of two dependencies (one over mTLS), the breaker can be watched opening and closing, and one Ctrl-C
 * (SIGINT) stops all of them, leaving no process behind and every port free. */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BUN, deadPort, DENO, parseMetrics, ROOT, sleep, startProcess } from './helpers.ts';

const hasOpenssl = spawnSync('sh', ['-c', 'command -v openssl']).status === 0;
if (!hasOpenssl) {
  console.warn(
    '\n*** openssl not installed (Debian package openssl): the demo runs without its mTLS payments leg, and these tests check that instead. ***\n',
  );
}
const ORDER = 'Order received. Inventory says: {"item":"widget","stock":42}' +
  (hasOpenssl ? '. Payments says: {"payment":"accepted","client":"order-service"}' : '');
const demoPorts = async () => ({
  ORDER_PORT: await deadPort(),
  AMBASSADOR_PORT: await deadPort(),
  ADMIN_PORT: await deadPort(),
  INVENTORY_PORT: await deadPort(),
  PAYMENTS_PORT: await deadPort(),
});

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};
const listening = (port: number) =>
  new Promise<boolean>((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    s.on('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });

describe('npm start (the demo runner)', () => {
  it('runs the chain, lets the breaker be watched as the banner says, and stops all four on Ctrl-C', async () => {
    const demo = path.join(ROOT, 'dist', 'scripts', 'demo.mjs');
    expect(existsSync(demo), 'run `npm run build` first').toBe(true);
    const ports = await demoPorts();
    // Its own process group, as a terminal gives it: Ctrl-C reaches the whole group.
    const p = startProcess(
      [process.execPath, demo],
      Object.fromEntries(Object.entries(ports).map(([k, v]) => [k, String(v)])),
      { detached: true },
    );
    try {
      await p.waitForLine((l) => l.includes('Ctrl-C stops them all'));
      expect(p.lines.join('\n')).toContain(`curl http://localhost:${ports.ORDER_PORT}/order`);
      const res = await fetch(`http://127.0.0.1:${ports.ORDER_PORT}/order`);
      expect(await res.text()).toBe(ORDER);
      await p.waitForLine((l) =>
        l.startsWith('[ambassador]') && l.includes('route=inventory method=GET path=/inventory status=200')
      );
      if (hasOpenssl) {
        await p.waitForLine((l) =>
          l.startsWith('[ambassador]') && l.includes('route=payments method=POST path=/payments status=200')
        );
      }

      // The banner's breaker walk-through, as a newcomer would type it.
      const a = `http://127.0.0.1:${ports.AMBASSADOR_PORT}`;
      expect(p.lines.join('\n')).toContain(
        `for i in 1 2; do curl 'http://localhost:${ports.AMBASSADOR_PORT}/inventory?fail_percent=100'; done`,
      );
      for (let i = 0; i < 2; i++) expect((await fetch(`${a}/inventory?fail_percent=100`)).status).toBe(503);
      const open = await fetch(`${a}/inventory`);
      expect(open.status).toBe(503);
      expect(open.headers.get('retry-after')).toBe('5');
      const state = async () =>
        parseMetrics(await (await fetch(`http://127.0.0.1:${ports.ADMIN_PORT}/metrics`)).text());
      const key = `route="inventory",endpoint="127.0.0.1:${ports.INVENTORY_PORT}"`;
      expect((await state()).get(`ambassador_upstream_endpoint_state{${key},state="open"}`)).toBe(1);
      await sleep(5100);
      expect((await fetch(`${a}/inventory`)).status).toBe(200);
      expect((await state()).get(`ambassador_upstream_endpoint_state{${key},state="closed"}`)).toBe(1);
    } catch (err) {
      p.kill('SIGINT'); // the runner stops its three processes; no test failure leaves them behind
      await p.exited;
      throw err;
    }

    const children = (await import('node:child_process')).execFileSync('pgrep', ['-P', String(p.pid)]).toString().trim()
      .split('\n').map(Number);
    expect(children).toHaveLength(hasOpenssl ? 4 : 3);
    process.kill(-p.pid, 'SIGINT'); // Ctrl-C: the whole foreground group
    const { code } = await p.exited;
    expect(code).toBe(0);
    for (const pid of children) expect(alive(pid), `child ${pid} still running`).toBe(false);
    for (const port of Object.values(ports)) expect(await listening(port), `port ${port} still open`).toBe(false);
    // In the README's order: the app, then the ambassador (which drained), then the upstreams; each exit 0.
    expect(exitsIn(p.lines.join('\n'))).toEqual(STOP_ORDER);
    expect(p.lines.some((l) => l.startsWith('[ambassador]') && l.includes('drain complete'))).toBe(true);
  });
});

/** The order every runner stops its processes in, as the README says: the app, the ambassador (after its
 * drain), the upstreams; each exits 0 on its one SIGTERM. */
const STOP_ORDER = [
  'order code 0',
  'ambassador code 0',
  'inventory code 0',
  ...(hasOpenssl ? ['payments code 0'] : []),
];
const exitsIn = (out: string) =>
  out.split('\n').filter((l) => / exited \(/.test(l)).map((l) =>
    `${/^\[([\w-]+)/.exec(l)?.[1]} ${/exited \((.*)\)/.exec(l)?.[1]}`
  );

describe.each([
  ['deno task demo (the same chain under Deno)', [DENO, 'task', 'demo'], 'The chain is up (Deno, from the sources)'],
  ['bun scripts/demo.ts (the ambassador under Bun)', [BUN, 'scripts/demo.ts'], 'The chain is up'],
])('%s', (_name, argv, banner) => {
  it("runs the chain and stops on Ctrl-C in the README's order, leaving every port free", async () => {
    const ports = await demoPorts();
    // Its own process group, as a terminal gives it: Ctrl-C reaches the whole group.
    const child = spawn(argv[0], argv.slice(1), {
      cwd: ROOT,
      detached: true,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: {
        PATH: process.env.PATH ?? '',
        HOME: process.env.HOME ?? '/tmp',
        NO_COLOR: '1',
        DENO_NO_UPDATE_CHECK: '1',
        ...Object.fromEntries(Object.entries(ports).map(([k, v]) => [k, String(v)])),
      },
    });
    let out = '';
    child.stdout!.on('data', (d) => (out += d));
    child.stderr!.on('data', (d) => (out += d));
    const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
    try {
      for (let i = 0; i < 200 && !out.includes('Ctrl-C stops them all'); i++) await sleep(100);
      expect(out).toContain(banner);
      const res = await fetch(`http://127.0.0.1:${ports.ORDER_PORT}/order`);
      expect(await res.text()).toBe(ORDER);
    } finally {
      process.kill(-child.pid!, 'SIGINT');
      await exited;
    }
    for (let i = 0; i < 50; i++) {
      const open = await Promise.all(Object.values(ports).map(listening));
      if (!open.includes(true)) break;
      await sleep(100);
    }
    for (const port of Object.values(ports)) expect(await listening(port), `port ${port} still open`).toBe(false);
    // Deno's child_process reports each child as ended by the signal it was sent, even one that handled it
    // and exited 0 (the ambassador's drain line below shows it did): there the order alone is compared.
    const exits = exitsIn(out);
    expect(argv[0] === DENO ? exits.map((e) => e.split(' ')[0]) : exits).toEqual(
      argv[0] === DENO ? STOP_ORDER.map((e) => e.split(' ')[0]) : STOP_ORDER,
    );
    expect(out).toMatch(/\[ambassador\][^\n]*drain complete/);
  });
});
