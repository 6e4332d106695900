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
    ],
  });
  const page = browser.pages()[0] ?? await browser.newPage();
  page.on('console', (msg) => consoleLines.push(`[console.${msg.type()}] ${msg.text()}`));
  page.on('pageerror', (err) => consoleLines.push(`[pageerror] ${err}`));
  await page.goto(pageUrl);
  await page.waitForFunction(() => window.webnicTestsReady === true, null, { timeout: 10000 });
  const result = await page.evaluate(
    ([fn, arg]) => window.webnicTests[fn](arg),
    [name, JSON.parse(argJson)],
  );
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
