/** The text log format, for people: values that could pass for more fields are quoted. */
import { describe, expect, it } from 'vitest';
import { createLogger } from '../../ambassador.ts';

describe('text log lines', () => {
  it('quote any value that could pass for more fields, so a field can never be forged', () => {
    const lines: string[] = [];
    const log = createLogger('text', 'info', (l) => lines.push(l));
    log('info', 'request', {
      id: 'x route=admin method=DELETE status=200',
      path: '/a b"c',
      route: 'default',
      status: 200,
      ok: 'plain-value_1.2:/@+',
    });
    const line = lines[0];
    expect(line).toContain('id="x route=admin method=DELETE status=200"');
    expect(line).toContain('path="/a b\\"c"');
    expect(line).toContain('ok=plain-value_1.2:/@+');
    // Outside the quoted values, each field appears once.
    const bare = line.replace(/"(?:[^"\\]|\\.)*"/g, '""');
    expect(bare.match(/ route=/g)).toHaveLength(1);
    expect(bare.match(/ status=/g)).toHaveLength(1);
  });
});
