// A new user on the demo page the gateway serves: open it (it connects by itself from the
// gateway's config.json), netcat a line over TCP and over UDP to echo servers, run the speed
// test, save a screenshot. Prints `RESULT <json>`; the page console goes to stderr.
//
//   node demo_user.mjs <demo url> <echo host> <tcp port> <udp port> <host:port/path> <screenshot.png> <timeout ms>
import { createRequire } from 'node:module';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const require = createRequire(new URL('../../wasm-client/package.json', import.meta.url));
const { chromium } = require('playwright-core');

const [demoUrl, echoHost, tcpPort, udpPort, target, screenshot, timeoutMs] = process.argv.slice(2);
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

// Types `line` into the netcat box, presses Enter, and waits until the log shows it again
// after `mark` (the echo server's reply).
async function echoLine(page, line) {
  const before = (await page.textContent('#log')).length;
  await page.fill('#line', line);
  await page.press('#line', 'Enter');
  await page.waitForFunction(([at, text]) => document.getElementById('log').textContent.slice(at).includes(text),
    [before, line], { timeout: 20000 });
}

try {
  browser = await chromium.launchPersistentContext(userDataDir, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1100, height: 900 },
    args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = browser.pages()[0] ?? await browser.newPage();
  page.on('console', (msg) => consoleLines.push(`[console.${msg.type()}] ${msg.text()}`));
  page.on('pageerror', (err) => consoleLines.push(`[pageerror] ${err}`));
  await page.goto(demoUrl);
  // No clicks: the page read config.json and connected.
  await page.waitForFunction(() => /^(connected|failed)/.test(document.getElementById('status').textContent),
    null, { timeout: 30000 });
  const status = await page.textContent('#status');
  if (!status.startsWith('connected')) throw new Error(`demo did not connect: ${status}`);
  const result = { status, gateway: await page.inputValue('#gateway'), hash: await page.inputValue('#hash') };

  await page.selectOption('#proto', 'tcp');
  await page.fill('#host', echoHost);
  await page.fill('#port', tcpPort);
  await page.click('#open');
  await page.waitForFunction(() => /-- TCP /.test(document.getElementById('log').textContent));
  await echoLine(page, 'hello over tcp from the demo');
  result.tcpEcho = true;

  await page.selectOption('#proto', 'udp');
  await page.fill('#port', udpPort);
  await page.click('#open');
  await page.waitForFunction(() => /-- UDP /.test(document.getElementById('log').textContent));
  await echoLine(page, 'hello over udp from the demo');
  result.udpEcho = true;
  await page.click('#close');

  await page.fill('#url', target);
  await page.click('#speed');
  await page.waitForFunction(() => document.getElementById('sha').textContent.length === 64
    || /Error/.test(document.getElementById('rate').textContent), null, { timeout: Number(timeoutMs) });
  result.rate = await page.textContent('#rate');
  result.bytes = Number(await page.getAttribute('#rate', 'data-bytes'));
  result.sha256 = await page.textContent('#sha');
  result.log = await page.textContent('#log');
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`RESULT ${JSON.stringify(result)}`);
  console.error(`page console:\n${consoleLines.join('\n')}`);
  await done(0);
} catch (error) {
  console.error(`FAILED: ${error && error.stack ? error.stack : error}\npage console:\n${consoleLines.join('\n')}`);
  await done(1);
}
