/**
 * Builds the container images from the Containerfile, one target each, after building the artifacts
 * they package (run through `npm run images`, which builds dist/ and the Node single executable first).
 *
 *   npm run images                                      public base images (needs a registry)
 *   npm run images -- --registry registry.example.com/team --push
 *   npm run images -- --local-bases                     bases made from this machine's own node and
 *                                                       libraries, where no registry can be reached
 *   npm run images -- --local-bases --private-storage /tmp/podman   podman with its own storage and
 *                                                       config, for hosts that need one (see README)
 *
 * Images: REGISTRY/ambassador:{deno,sea,bun,node}, :latest (bun: the one the pod-budget benchmark chooses),
 * REGISTRY/order-service:latest, REGISTRY/inventory-service:latest. It prints each image's size.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { shippedNode } from './node.ts';
import { privatePodmanEnv } from './podman.ts';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, path.basename(path.dirname(here)) === 'dist' ? '../..' : '..');

function option(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}
const registry = (option('--registry') ?? 'localhost').replace(/\/$/, '');
const localBases = process.argv.includes('--local-bases');
const push = process.argv.includes('--push');
const privateStorage = option('--private-storage');

const env = { ...process.env, ...(privateStorage ? privatePodmanEnv(path.resolve(privateStorage)) : {}) };
const podman = (...args: string[]) =>
  execFileSync('podman', args, { cwd: root, env, stdio: ['ignore', 'pipe', 'inherit'] }).toString().trim();

/** The shared libraries a binary loads, as `ldd` lists them. */
function libraries(binary: string): string[] {
  return execFileSync('ldd', [binary]).toString().split('\n')
    .map((l) => /(\/\S+) \(0x/.exec(l)?.[1])
    .filter((p): p is string => p !== undefined);
}

/** A base image from this machine's files: the given binaries at the given paths, the libraries that
 * they and `libsOf` load, the CA bundle, and a passwd with the non-root user 65532. No shell, no
 * package manager. */
function buildLocalBase(tag: string, files: Record<string, string>, libsOf: string[] = []): void {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ambassador-base-'));
  try {
    const rootfs = path.join(dir, 'rootfs');
    const put = (from: string, to: string) => {
      mkdirSync(path.join(rootfs, path.dirname(to)), { recursive: true });
      copyFileSync(realpathSync(from), path.join(rootfs, to));
    };
    for (const [to, from] of Object.entries(files)) put(from, to);
    for (const binary of [...Object.values(files), ...libsOf]) for (const lib of libraries(binary)) put(lib, lib);
    if (existsSync('/etc/ssl/certs/ca-certificates.crt')) {
      put('/etc/ssl/certs/ca-certificates.crt', '/etc/ssl/certs/ca-certificates.crt');
    }
    mkdirSync(path.join(rootfs, 'etc'), { recursive: true });
    mkdirSync(path.join(rootfs, 'tmp'), { recursive: true });
    writeFileSync(
      path.join(rootfs, 'etc/passwd'),
      'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n',
    );
    writeFileSync(path.join(rootfs, 'etc/group'), 'root:x:0:\nnonroot:x:65532:\n');
    writeFileSync(path.join(dir, 'Containerfile'), 'FROM scratch\nCOPY rootfs/ /\nUSER 65532:65532\n');
    podman('build', '--quiet', '-t', tag, dir);
    console.log(`images: local base ${tag}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const buildArgs: string[] = [];
if (localBases) {
  // glibc and the C++ runtime, as distroless/cc has them: what a Node single executable and a
  // deno-compiled binary load.
  const denoBinary = path.join(root, 'node_modules', 'deno', 'deno');
  const bunBinary = path.join(root, 'bin', 'ambassador-bun');
  const node = shippedNode(root); // Node 24, as the public base has it
  buildLocalBase('localhost/ambassador-base-glibc:local', {}, [
    node,
    ...[denoBinary, bunBinary].filter((b) => existsSync(b)),
  ]);
  buildLocalBase('localhost/ambassador-base-node:local', { '/nodejs/bin/node': node });
  buildArgs.push(
    '--build-arg',
    'GLIBC_BASE=localhost/ambassador-base-glibc:local',
    '--build-arg',
    'NODE_BASE=localhost/ambassador-base-node:local',
  );
}

// The deno-compiled ambassador only where `deno compile` can get its runtime (see README).
const deno = path.join(root, 'node_modules', '.bin', 'deno');
const compiled = spawnSync(deno, [
  'compile',
  '--no-config',
  '--allow-net',
  '--allow-env',
  '--allow-read',
  '--output',
  'bin/ambassador',
  'dist/ambassador.mjs',
], { cwd: root, env: { ...env, NO_COLOR: '1' }, encoding: 'utf8' });
if (compiled.status !== 0) {
  console.warn('images: SKIPPED the `ambassador` (deno) target: `deno compile` could not get its denort runtime here');
}

const targets: Array<{ target: string; tag: string }> = [
  ...(compiled.status === 0 ? [{ target: 'ambassador', tag: `${registry}/ambassador:deno` }] : []),
  { target: 'ambassador-sea', tag: `${registry}/ambassador:sea` },
  { target: 'ambassador-bun', tag: `${registry}/ambassador:bun` },
  { target: 'ambassador-node', tag: `${registry}/ambassador:node` },
  { target: 'order-service', tag: `${registry}/order-service:latest` },
  { target: 'inventory-service', tag: `${registry}/inventory-service:latest` },
];
for (const { target, tag } of targets) {
  podman('build', '--quiet', '--target', target, ...buildArgs, '-t', tag, '-f', 'Containerfile', '.');
}
// :latest is the image k8s/ runs: the one that does best inside the pod's 100m CPU and 128Mi (README).
podman('tag', `${registry}/ambassador:bun`, `${registry}/ambassador:latest`);

for (const tag of [...targets.map((t) => t.tag), `${registry}/ambassador:latest`]) {
  const bytes = Number(podman('image', 'inspect', '--format', '{{.Size}}', tag));
  console.log(`images: ${tag.padEnd(48)} ${(bytes / 1024 / 1024).toFixed(1)} MiB`);
  if (push) podman('push', tag);
}
