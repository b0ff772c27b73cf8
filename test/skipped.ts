/** A reporter that ends the run with every skipped test and why, file by file, so a green run with skips
 * says plainly that it was not a full run (vitest's own summary gives only a count). The reason is in the
 * skipped suite's name (`skippedBecause` in helpers.ts). */
import path from 'node:path';
import type { Reporter, TestModule } from 'vitest/node';

export default class SkippedTests implements Reporter {
  onTestRunEnd(modules: ReadonlyArray<TestModule>): void {
    const groups = new Map<string, number>();
    for (const module of modules) {
      for (const test of module.children.allTests()) {
        if (test.result().state !== 'skipped' || test.options.mode === 'todo') continue;
        // Tests left out by a -t filter are not skips: only those a condition skipped (their suite says why).
        const suite = test.parent.type === 'suite' ? test.parent.name : test.name;
        if (!suite.includes(' — SKIPPED: ') && !test.name.includes(' — SKIPPED: ')) continue;
        const key = `${path.relative(process.cwd(), module.moduleId)} › ${
          test.name.includes(' — SKIPPED: ') ? test.name : suite
        }`;
        groups.set(key, (groups.get(key) ?? 0) + 1);
      }
    }
    if (groups.size === 0) return;
    const total = [...groups.values()].reduce((a, b) => a + b, 0);
    console.log(
      `\nSkipped, not passed: ${total} test(s)\n${[...groups].map(([key, n]) => `  ${key} (${n})`).join('\n')}\n`,
    );
  }
}
