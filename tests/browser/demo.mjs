// Drives wasm-client/demo/index.html in headless Chromium like a user: connect, download a file
// with the speed test, then save a screenshot. Prints `RESULT <rate text>`.
//
//   node demo.mjs <demo url with ?gateway=&hash=> <host:port/path> <screenshot.png> <timeout ms>
import { createRequire } from 'node:module';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const require = createRequire(new URL('../../wasm-client/package.json', import.meta.url));
const { chromium } = require('playwright-core');

const [demoUrl, target, screenshot, timeoutMs] = process.argv.slice(2);
const userDataDir = mkdtempSync(join(tmpdir(), 'webnic-chromium-'));
const consoleLines = [];
let browser;
const done = async (code) => {
  if (browser) await browser.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
  process.exit(code);
};
setTimeout(() => {
  console.error(`timed out after ${timeoutMs} ms; page console:\n${consoleLines.join('\n')}`);
  done(2);
}, Number(timeoutMs));

try {
  browser = await chromium.launchPersistentContext(userDataDir, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = browser.pages()[0] ?? await browser.newPage();
  page.on('console', (msg) => consoleLines.push(`[console.${msg.type()}] ${msg.text()}`));
  page.on('pageerror', (err) => consoleLines.push(`[pageerror] ${err}`));
  await page.goto(demoUrl);
  await page.click('#connect');
  await page.waitForFunction(() => /^(connected|failed)/.test(document.getElementById('status').textContent));
  const status = await page.textContent('#status');
  if (!status.startsWith('connected')) throw new Error(`demo did not connect: ${status}`);
  await page.fill('#url', target);
  await page.click('#speed');
  await page.waitForFunction(() => / MB in /.test(document.getElementById('rate').textContent), null,
    { timeout: Number(timeoutMs) });
  const rate = await page.textContent('#rate');
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`RESULT ${status} | ${rate}`);
  console.error(`page console:\n${consoleLines.join('\n')}`);
  await done(0);
} catch (error) {
  console.error(`FAILED: ${error && error.stack ? error.stack : error}\npage console:\n${consoleLines.join('\n')}`);
  await done(1);
}
