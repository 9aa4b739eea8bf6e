// A node:test reporter that counts, per test file, the tests that passed, failed and were skipped,
// and writes one JSON object when the run ends (lib/check-counts.js reads it; `npm test` runs both).
//
// Why: `node --test` exits 0 when it ran nothing (a glob that matched no file, a file whose
// `describe` registers no test: Node then reports the file itself as one passing "test"), so a
// count in the summary line cannot tell "all passed" from "nothing ran". Counted here: only real
// tests (not suites, not the file-level wrapper Node invents for a file without tests), by file.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export default async function* countReporter(source) {
  const files = {};
  const orphans = { pass: 0, fail: 0 }; // events without a file (a crash of the runner itself)
  const of = (file) => {
    if (!file) return orphans;
    files[file] ??= { pass: 0, fail: 0, skip: 0, todo: 0, failed: [] };
    return files[file];
  };
  for await (const ev of source) {
    if (ev.type !== 'test:pass' && ev.type !== 'test:fail') continue;
    const d = ev.data;
    const f = of(d.file);
    if (d.details && d.details.type === 'suite') {
      // A suite that failed (e.g. its `before` hook threw) fails the run even if no test ran.
      if (ev.type === 'test:fail') { f.fail += 1; f.failed?.push(d.name); }
      continue;
    }
    if (ev.type === 'test:fail') { f.fail += 1; f.failed?.push(d.name); continue; }
    if (d.skip !== undefined) { f.skip += 1; continue; }
    if (d.todo !== undefined) { f.todo += 1; continue; }
    // A file that registered no test is reported as one passing test named after the file.
    if (d.nesting === 0 && d.name === d.file) { f.empty = true; continue; }
    f.pass += 1;
  }
  // The run is over: the port reservations of its test files (lib/harness.js `freePorts`, a
  // directory named after this runner's pid, their parent) go.
  fs.rmSync(path.join(os.tmpdir(), `gopush-e2e-ports-${process.pid}`), { recursive: true, force: true });
  yield `${JSON.stringify({ files, orphans }, null, 2)}\n`;
}
