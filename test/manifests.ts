/** Reads k8s/: the kustomization, its resources, and the images it sets. */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { parseAllDocuments } from 'yaml';
import { ROOT } from './helpers.ts';

export interface K8sObject {
  apiVersion: string;
  kind: string;
  metadata: { name: string };
  // The manifests are checked against the API schema separately; here they are plain data.
  spec: any; // eslint-disable-line @typescript-eslint/no-explicit-any
}

export interface Kustomization {
  resources: string[];
  images: Array<{ name: string; newName?: string; newTag?: string }>;
}

export function readYaml(file: string): unknown[] {
  return parseAllDocuments(readFileSync(path.join(ROOT, 'k8s', file), 'utf8')).map((d) => {
    if (d.errors.length) throw new Error(`${file}: ${d.errors.map((e) => e.message).join('; ')}`);
    return d.toJS();
  });
}

export function kustomization(): Kustomization {
  return readYaml('kustomization.yaml')[0] as Kustomization;
}

/** Every object of every resource the kustomization names, with the file it came from. */
export function objects(): Array<{ file: string; object: K8sObject }> {
  return kustomization().resources.flatMap((file) =>
    readYaml(file).map((object) => ({ file, object: object as K8sObject }))
  );
}

/** The image a container name resolves to after the kustomization's `images:`. */
export function resolveImage(image: string, k = kustomization()): string {
  const entry = k.images.find((i) => i.name === image);
  return entry ? `${entry.newName ?? image}:${entry.newTag ?? 'latest'}` : image;
}
