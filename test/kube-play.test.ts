/** The manifests run for real: images built from the Containerfile on local bases, the Deployments run
 * by `podman kube play` on an internal network of their own, and the article's checks made inside it.
 * Everything it creates (storage, network, pods, images) lives under one temporary folder and is removed
 * at the end, even on failure. Where podman cannot run containers, the test says so and skips.
 *
 *   AMBASSADOR_IMAGE=localhost/ambassador:node npx vitest run test/kube-play.test.ts
 *
 * plays another of the images `npm run images` builds as the sidecar (by default the kustomization's). */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { stringify } from 'yaml';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { IMAGE_BUN_ENV } from '../bench/common.ts';
import { privatePodmanEnv, removePodmanFolder } from '../scripts/podman.ts';
import { ROOT, skippedBecause, sleep, threadPolicies } from './helpers.ts';
import { type K8sObject, kustomization, objects, resolveImage } from './manifests.ts';

const dir = mkdtempSync(path.join(os.tmpdir(), 'ambassador-kube-'));
const env = { ...process.env, ...privatePodmanEnv(dir) };
const network = `ambassador-test-${process.pid}`;
const podman = (...args: string[]) =>
  execFileSync('podman', args, { env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();

function whyNot(): string | undefined {
  const probe = spawnSync('podman', ['info', '--format', '{{.Host.OCIRuntime.Name}}'], { env, encoding: 'utf8' });
  if (probe.error) {
    return 'podman is not installed (Debian packages podman, buildah, runc, netavark, aardvark-dns, catatonit, iptables)';
  }
  if (probe.status !== 0) return `podman cannot run here: ${probe.stderr.trim().split('\n').pop()}`;
  return undefined;
}
const why = whyNot();
if (why) {
  const left = removePodmanFolder(dir, env);
  if (left) console.warn(`kube-play: could not remove ${left}`);
}

/** The manifests as podman 4 can play them: images resolved by the kustomization and never pulled, one
 * replica, and the native sidecar moved into `containers` — podman has no native sidecars, so this is
 * the variant for clusters older than 1.29 that the README describes. */
function render(object: K8sObject): K8sObject {
  const d = structuredClone(object);
  const spec = d.spec.template.spec;
  const sidecars = (spec.initContainers ?? []).filter((c: { restartPolicy?: string }) => c.restartPolicy === 'Always');
  spec.initContainers = (spec.initContainers ?? []).filter((c: { restartPolicy?: string }) =>
    c.restartPolicy !== 'Always'
  );
  if (spec.initContainers.length === 0) delete spec.initContainers;
  spec.containers = [
    ...sidecars.map(({ restartPolicy: _, ...c }: { restartPolicy?: string }) => c),
    ...spec.containers,
  ];
  for (const c of spec.containers) {
    c.image = c.name === 'ambassador' && process.env.AMBASSADOR_IMAGE
      ? process.env.AMBASSADOR_IMAGE
      : resolveImage(c.image, kustomization());
    c.imagePullPolicy = 'Never';
    // Shorter limits than production's, so "inventory down" is over in seconds.
    // (and an ejection that stops growing at 5 s, so the recovery check waits on the inventory, not on
    // how long the breaker's backoff has grown while it was down).
    if (c.name === 'ambassador') {
      c.env = [...c.env, { name: 'TRY_TIMEOUT_MS', value: '1000' }, { name: 'REQUEST_TIMEOUT_MS', value: '4000' }, {
        name: 'BREAKER_OPEN_MAX_MS',
        value: '5000',
      }];
    }
  }
  d.spec.replicas = 1;
  return d;
}

describe.skipIf(why !== undefined)(skippedBecause("podman kube play: the article's system in pods", why), () => {
  const files: Record<string, string> = {};
  /** Runs a one-off client in the pod network (the order-service image has node, and nothing else). */
  const client = (url: string) => {
    const r = spawnSync('podman', [
      'run',
      '--rm',
      '--network',
      network,
      '--entrypoint',
      '/nodejs/bin/node',
      'localhost/order-service:latest',
      '-e',
      `fetch(${
        JSON.stringify(url)
      }).then(async (r) => console.log(r.status + ' ' + await r.text()), (e) => console.log('000 ' + e.cause?.code))`,
    ], { env, encoding: 'utf8' });
    return r.stdout.trim();
  };
  const until = async (url: string, pred: (out: string) => boolean, seconds = 30) => {
    let out = '';
    // Bounded by the clock: each try is itself a `podman run` of a second or so.
    for (const end = Date.now() + seconds * 1000; !pred(out = client(url)) && Date.now() < end;) await sleep(500);
    return out;
  };

  beforeAll(() => {
    execFileSync(process.execPath, [
      path.join(ROOT, 'dist/scripts/images.mjs'),
      '--local-bases',
      '--private-storage',
      dir,
    ], { cwd: ROOT, stdio: 'inherit' });
    podman('network', 'create', '--internal', network);
    for (const { object } of objects()) {
      if (object.kind !== 'Deployment') continue; // Services: the network alias below stands in for them
      files[object.metadata.name] = path.join(dir, `${object.metadata.name}.yaml`);
      writeFileSync(files[object.metadata.name], stringify(render(object)));
    }
    podman('kube', 'play', '--network', `${network}:alias=inventory-service`, files['inventory-service']);
    podman('kube', 'play', '--network', network, files['order-service']);
  }, 180_000);

  afterAll(() => {
    for (const file of Object.values(files)) spawnSync('podman', ['kube', 'play', '--down', file], { env });
    spawnSync('podman', ['network', 'rm', '-f', network], { env });
    const left = removePodmanFolder(dir, env);
    if (left) console.warn(`kube-play: could not remove ${left}`);
  });

  it('the chain answers through the sidecar', async () => {
    const out = await until('http://order-service-pod-0:3000/order', (o) => o.startsWith('200 '));
    expect(out).toBe('200 Order received. Inventory says: {"item":"widget","stock":42}');
    expect(client('http://order-service-pod-0:9901/readyz')).toBe('200 ready');
  });

  it("the sidecar knows the container's limits, told by the manifest whatever its runtime may read", () => {
    const logs = podman('logs', 'order-service-pod-0-ambassador').split('\n').filter((l) => l.startsWith('{'));
    const lines = logs.map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines.find((l) => l.msg === 'listening')).toMatchObject({
      memory_limit_bytes: 128 * 1024 ** 2,
      cpu_limit_cores: 0.1,
      process_max_in_flight: 32,
    });
    expect(lines.filter((l) => String(l.msg).includes('limits could not be read'))).toEqual([]);
    // Told, not only found: what a Deno sidecar would have to go by.
    const envOf = podman(
      'inspect',
      '--format',
      '{{range .Config.Env}}{{println .}}{{end}}',
      'order-service-pod-0-ambassador',
    );
    expect(envOf.split('\n')).toEqual(
      expect.arrayContaining([`MEMORY_LIMIT_BYTES=${128 * 1024 ** 2}`, 'CPU_LIMIT_MILLICORES=100']),
    );
  });

  it('every container runs as the non-root user on a read-only root filesystem', () => {
    for (
      const name of [
        'order-service-pod-0-ambassador',
        'order-service-pod-0-order-service',
        'inventory-service-pod-0-inventory-service',
      ]
    ) {
      expect(podman('inspect', '--format', '{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}', name), name).toBe(
        '65532:65532 true',
      );
    }
  });

  it('the Bun sidecar runs with the JavaScriptCore options and the scheduling policy its image sets', (ctx) => {
    const image = podman('inspect', '--format', '{{.ImageName}}', 'order-service-pod-0-ambassador');
    if (!image.endsWith('ambassador:bun')) ctx.skip(`the sidecar is ${image}, not the Bun image`);
    const envOf = podman(
      'inspect',
      '--format',
      '{{range .Config.Env}}{{println .}}{{end}}',
      'order-service-pod-0-ambassador',
    );
    expect(Object.keys(IMAGE_BUN_ENV).length).toBeGreaterThan(0);
    for (const [k, v] of Object.entries(IMAGE_BUN_ENV)) expect(envOf.split('\n')).toContain(`${k}=${v}`);
    // SCHED_POLICY=batch taken as the non-root user under the container's seccomp profile: every thread, the HTTP
    // client thread that the chain's requests started included, is SCHED_BATCH (3), as this host's /proc tells.
    const pid = podman('inspect', '--format', '{{.State.Pid}}', 'order-service-pod-0-ambassador');
    const threads = threadPolicies(pid).map(([name, policy]) => `${name}:${policy}`);
    expect(threads).toContain('HTTP Client:3');
    expect(threads.filter((t) => !t.endsWith(':3'))).toEqual([]);
  });

  it('inventory taken down: the order fails fast with the reason, the ambassador logs each retry', async () => {
    // The container stops, its pod (and so the Service name) stays: as a Service with no ready endpoint.
    podman('stop', '--time', '2', 'inventory-service-pod-0-inventory-service');
    const out = client('http://order-service-pod-0:3000/order');
    // Refused, or — where the network's DNS stalls once the name has no endpoint — timed out.
    expect(out).toMatch(/^502 upstream error: 50[24] ambassador: upstream (failed|timed out): .*\(\d attempts?\)/);
    const logs = podman('logs', 'order-service-pod-0-ambassador');
    expect(logs).toMatch(/attempt 1 failed: .*retrying/);
    expect(logs).toMatch(/attempt \d failed: .*giving up \((attempts|deadline)\)/);
  });

  it('inventory back: the chain recovers without restarting the app or its sidecar', async () => {
    podman('start', 'inventory-service-pod-0-inventory-service');
    // podman's network may take a while to carry traffic to the restarted container again (seen: over
    // 30 s, connections timing out meanwhile); the breaker probes every 5 s until it does.
    const out = await until('http://order-service-pod-0:3000/order', (o) => o.startsWith('200 '), 100);
    const sidecarLog = () =>
      spawnSync('podman', ['logs', '--tail', '30', 'order-service-pod-0-ambassador'], { env, encoding: 'utf8' }).stdout;
    expect(out, out.startsWith('200 ') ? '' : sidecarLog()).toBe(
      '200 Order received. Inventory says: {"item":"widget","stock":42}',
    );
    expect(podman('inspect', '--format', '{{.RestartCount}}', 'order-service-pod-0-ambassador')).toBe('0');
  }, 130_000);
});
