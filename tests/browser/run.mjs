// Runs one test function of tests/browser/page.html in headless Chromium (Debian's, through
// playwright-core) and prints `RESULT <json>`; the page's console goes to stderr.
//
//   node run.mjs <page url> <function name> <json argument> <timeout ms>
import { createRequire } from 'node:module';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

// playwright-core lives in wasm-client/node_modules (installed by scripts/build-wasm.sh).
const require = createRequire(new URL('../../wasm-client/package.json', import.meta.url));
const { chromium } = require('playwright-core');

const [pageUrl, name, argJson, timeoutMs] = process.argv.slice(2);
const userDataDir = mkdtempSync(join(tmpdir(), 'webnic-chromium-'));
const consoleLines = [];
let browser;
const limit = setTimeout(async () => {
  console.error(`timed out after ${timeoutMs} ms; page console:\n${consoleLines.join('\n')}`);
  if (browser) await browser.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
  process.exit(2);
}, Number(timeoutMs));

try {
  // A fresh profile each run (playwright passes it as --user-data-dir).
  browser = await chromium.launchPersistentContext(userDataDir, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless=new', '--no-sandbox', '--disable-gpu', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      // Extra flags a test passes (a JSON array), e.g. the browser bench's trust in its relays'
      // self-signed certificate (--ignore-certificate-errors-spki-list).
      ...JSON.parse(process.env.WEBNIC_CHROMIUM_ARGS || '[]'),
    ],
  });
  const page = browser.pages()[0] ?? await browser.newPage();
  page.on('console', (msg) => {
    consoleLines.push(`[console.${msg.type()}] ${msg.text()}`);
    // Lines the test waits for while the page function still runs (e.g. a listener's port).
    if (msg.text().startsWith('WEBNIC_READY ')) console.log(msg.text());
  });
  page.on('pageerror', (err) => consoleLines.push(`[pageerror] ${err}`));
  await page.goto(pageUrl);
  await page.waitForFunction(() => window.webnicTestsReady === true, null, { timeout: 60000 });
  // WEBNIC_PROFILE=1: CPU-profile the page during the test and print where its time went.
  const cdp = process.env.WEBNIC_PROFILE ? await browser.newCDPSession(page) : null;
  if (cdp) {
    await cdp.send('Profiler.enable');
    await cdp.send('Profiler.start');
  }
  const result = await page.evaluate(
    ([fn, arg]) => window.webnicTests[fn](arg),
    [name, JSON.parse(argJson)],
  );
  if (cdp) {
    const { profile } = await cdp.send('Profiler.stop');
    const self = new Map();
    const dt = profile.timeDeltas;
    const byId = new Map(profile.nodes.map((n) => [n.id, n]));
    for (let i = 0; i < profile.samples.length; i++) {
      const node = byId.get(profile.samples[i]);
      const key = `${node.callFrame.functionName || '(anon)'} ${node.callFrame.url.split('/').pop()}`;
      self.set(key, (self.get(key) ?? 0) + (dt[i] ?? 0));
    }
    const total = [...self.values()].reduce((a, b) => a + b, 0);
    const top = [...self.entries()].sort((a, b) => b[1] - a[1]).slice(0, 15);
    console.error(`profile: ${(total / 1000).toFixed(0)} ms sampled`);
    for (const [k, v] of top) console.error(`  ${(v / 1000).toFixed(1).padStart(8)} ms  ${k}`);
  }
  console.log(`RESULT ${JSON.stringify(result)}`);
  console.error(`page console:\n${consoleLines.join('\n')}`);
  clearTimeout(limit);
  await browser.close();
  rmSync(userDataDir, { recursive: true, force: true });
} catch (error) {
  console.error(`FAILED: ${error && error.stack ? error.stack : error}\npage console:\n${consoleLines.join('\n')}`);
  clearTimeout(limit);
  if (browser) await browser.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
  process.exit(1);
}
