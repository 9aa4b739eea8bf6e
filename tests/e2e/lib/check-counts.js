'use strict';
// Usage: node lib/check-counts.js COUNTS.json test/a.test.js test/b.test.js ...
//
// Fails (exit 1) unless every listed test file ran at least one test, none failed, none was
// skipped or left as todo, and no other file reported anything. COUNTS.json is what
// lib/count-reporter.mjs wrote. The file list is the shell's expansion of test/*.test.js, i.e.
// what the repository holds, so a file that stops loading or stops registering tests is red.

const fs = require('node:fs');
const path = require('node:path');

const [countsFile, ...listed] = process.argv.slice(2);
if (!countsFile || !listed.length || listed.some((f) => f.includes('*'))) {
  console.error(`check-counts: no test files given (${JSON.stringify(listed)})`);
  process.exit(1);
}
const { files, orphans } = JSON.parse(fs.readFileSync(countsFile, 'utf8'));
const byPath = new Map(Object.entries(files).map(([f, c]) => [path.resolve(f), c]));
const problems = [];
let total = 0;
for (const f of listed) {
  const c = byPath.get(path.resolve(f));
  byPath.delete(path.resolve(f));
  if (!c) { problems.push(`${f}: not run at all`); continue; }
  total += c.pass;
  if (c.pass === 0) problems.push(`${f}: 0 tests ran${c.empty ? ' (the file registered no test)' : ''}`);
  if (c.fail) problems.push(`${f}: ${c.fail} failed (${c.failed.slice(0, 3).join('; ')})`);
  if (c.skip || c.todo) problems.push(`${f}: ${c.skip} skipped, ${c.todo} todo (CI runs every test)`);
}
for (const [f] of byPath) problems.push(`${f}: reported tests but is not in the list`);
if (orphans.pass || orphans.fail) problems.push(`${orphans.pass + orphans.fail} results without a file`);
if (problems.length) {
  console.error(`check-counts: FAILED\n  ${problems.join('\n  ')}`);
  process.exit(1);
}
console.log(`check-counts: ${total} tests passed in ${listed.length} of ${listed.length} files, 0 failed, 0 skipped`);
