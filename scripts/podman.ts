/** Podman with a configuration and storage of its own, under one folder. Some hosts need it: hybrid
 * cgroups (runc works where crun does not) and no permission to raise rlimits (so explicit ulimits). */
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';

/** Writes containers.conf and storage.conf under `dir`; returns the environment that points podman at them. */
export function privatePodmanEnv(dir: string): Record<string, string> {
  mkdirSync(dir, { recursive: true });
  writeFileSync(
    path.join(dir, 'containers.conf'),
    [
      '[containers]',
      'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]',
      '[network]',
      'network_backend = "netavark"',
      `network_config_dir = "${dir}/networks"`,
      '[engine]',
      'runtime = "runc"',
      `tmp_dir = "${dir}/libpod-tmp"`,
      '',
    ].join('\n'),
  );
  writeFileSync(
    path.join(dir, 'storage.conf'),
    [
      '[storage]',
      'driver = "overlay"',
      `graphroot = "${dir}/storage"`,
      `runroot = "${dir}/runroot"`,
      '',
    ].join('\n'),
  );
  return {
    CONTAINERS_CONF: path.join(dir, 'containers.conf'),
    CONTAINERS_STORAGE_CONF: path.join(dir, 'storage.conf'),
  };
}

/** Removes a folder made for `privatePodmanEnv`, and never throws. Podman mounts its overlay storage
 * there even when it then fails to run anything (`podman info` without runc does), so the storage is reset
 * first and whatever stays mounted below the folder is unmounted before it is removed. Returns what could
 * not be removed, if anything. */
export function removePodmanFolder(dir: string, env: NodeJS.ProcessEnv): string | undefined {
  spawnSync('podman', ['system', 'reset', '--force'], { env, stdio: 'ignore' });
  const mountsBelow = () => {
    try {
      return readFileSync('/proc/mounts', 'utf8').split('\n').map((l) => l.split(' ')[1] ?? '')
        .map((m) => m.replace(/\\040/g, ' ')).filter((m) => m === dir || m.startsWith(`${dir}/`));
    } catch {
      return [];
    }
  };
  // Deepest first: a mount inside another must go before it.
  for (const mount of mountsBelow().sort((a, b) => b.length - a.length)) {
    spawnSync('umount', ['-l', mount], { stdio: 'ignore' });
  }
  try {
    rmSync(dir, { recursive: true, force: true });
    return undefined;
  } catch (err) {
    return `${dir}: ${(err as Error).message}`;
  }
}
