// Drives Debian's Chromium (through playwright-core, which brings no
// browser of its own) through mailgate's integrations page, checks what
// the page shows, and saves a screenshot of every step.
//
// Usage: node page.mjs SCENARIO PAGE_URL ACCOUNT SCREENSHOT_DIR
//   SCENARIO is one of:
//     authorize-and-test  the account needs authorization; authorize it,
//                         then run Test connection and see every step pass
//     revoked             run Test connection on an account whose grant was
//                         revoked; see it fail and ask for authorization
//     denied              authorize an account the OAuth server refuses;
//                         see the provider's error, explained
// Environment: MAILGATE_SECRETS, newline-separated strings that must never
// appear in the page (the client secret, tokens).
// Prints one JSON line on success (what the page showed); exits 1 with the
// reason otherwise. Tests call it from tests/integrations_page.rs.
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [scenario, pageUrl, account, shots] = process.argv.slice(2);
if (!shots) {
  console.error('usage: node page.mjs SCENARIO PAGE_URL ACCOUNT SCREENSHOT_DIR');
  process.exit(2);
}
const secrets = (process.env.MAILGATE_SECRETS || '').split('\n').filter(Boolean);
mkdirSync(shots, { recursive: true });
for (const f of readdirSync(shots)) if (f.startsWith(`${scenario}-`)) rmSync(join(shots, f));

// This machine reaches no internet: keep Chromium from trying.
const profile = mkdtempSync(join(tmpdir(), 'mailgate-chromium-'));
// A fresh --user-data-dir each run: playwright passes `profile` as it.
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-quic',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
  viewport: { width: 1100, height: 900 },
});
const page = context.pages()[0] || await context.newPage();
const problems = [];
page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text()}`); });
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
// Anything the page loads must come from the gateway itself.
const origin = new URL(pageUrl).origin;
const foreign = [];
page.on('request', (r) => {
  const u = new URL(r.url());
  if (u.origin !== origin && r.resourceType() !== 'document') foreign.push(r.url());
});

const card = () => page.locator(`#account-${account}`);
let shot = 0;
async function screenshot(name) {
  shot += 1;
  await page.screenshot({ path: join(shots, `${scenario}-${shot}-${name}.png`), fullPage: true });
}
async function noSecrets() {
  const html = await page.content();
  for (const s of secrets) assert.ok(!html.includes(s), 'the page shows a secret');
}
async function backOnPage() {
  await page.waitForURL((u) => u.origin === origin && u.pathname === new URL(pageUrl).pathname);
  await card().waitFor();
}
async function testConnection() {
  await card().locator('button.test').click();
  await backOnPage();
  const result = card().locator('.test-result');
  await result.waitFor();
  const steps = await result.locator('tr.step').evaluateAll((rows) => rows.map((r) => ({
    ok: r.classList.contains('good'),
    name: r.querySelector('.name').textContent,
    ms: r.querySelector('.ms').textContent,
    text: r.lastElementChild.textContent,
  })));
  return { ok: await result.evaluate((e) => e.classList.contains('good')), steps };
}

const seen = {};
try {
  const response = await page.goto(pageUrl);
  assert.equal(response.status(), 200);
  const headers = response.headers();
  assert.equal(headers['cache-control'], 'no-store');
  assert.match(headers['content-security-policy'], /default-src 'none'/);
  assert.match(headers['content-security-policy'], /frame-ancestors 'none'/);
  await card().waitFor();
  await noSecrets();

  if (scenario === 'authorize-and-test') {
    assert.equal(await card().getAttribute('data-needs-authorization'), 'true');
    assert.match(await card().locator('.token-state').innerText(), /Needs authorization/);
    // The redirect URL's Copy button puts the URL on the clipboard.
    await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin });
    const integration = page.locator(`[data-integration="${account}"]`);
    const shown = await integration.locator('code.redirect-url').innerText();
    await integration.locator('button.copy').click();
    await page.waitForFunction(() => document.querySelector('button.copy').textContent === 'Copied');
    seen.copied = await page.evaluate(() => navigator.clipboard.readText());
    assert.equal(seen.copied, shown);
    seen.redirectUrl = shown;
    await screenshot('needs-authorization');

    // Authorize: to the OAuth server and back, through the redirect URL.
    const visited = []; // every hop, redirects included
    page.on('request', (r) => { if (r.isNavigationRequest()) visited.push(r.url()); });
    await card().locator('button.authorize').click();
    await backOnPage();
    seen.visited = visited.map((u) => new URL(u).origin + new URL(u).pathname);
    assert.ok(visited.some((u) => new URL(u).origin !== origin), 'never went to the OAuth server');
    assert.equal(await card().getAttribute('data-needs-authorization'), 'false');
    assert.match(await card().locator('.authorization-outcome').innerText(), /^Last authorization: succeeded/);
    seen.tokenState = await card().locator('.token-state').innerText();
    assert.match(seen.tokenState, /Authorized: access token valid until/);
    await noSecrets();
    await screenshot('authorized');

    const test = await testConnection();
    seen.test = test;
    assert.ok(test.ok, `Test connection failed: ${JSON.stringify(test.steps)}`);
    assert.ok(test.steps.length >= 7, 'too few steps');
    for (const step of test.steps) assert.ok(step.ok, `step ${step.name} failed: ${step.text}`);
    await noSecrets();
    await screenshot('test-connection-passed');
  } else if (scenario === 'revoked') {
    const test = await testConnection();
    seen.test = test;
    assert.ok(!test.ok, 'Test connection passed with a revoked grant');
    assert.equal(test.steps.length, 1);
    assert.equal(test.steps[0].name, 'token');
    assert.ok(!test.steps[0].ok);
    assert.equal(await card().getAttribute('data-needs-authorization'), 'true');
    seen.tokenState = await card().locator('.token-state').innerText();
    assert.match(seen.tokenState, /Needs authorization/);
    assert.equal(await card().locator('button.authorize').innerText(), 'Authorize');
    await noSecrets();
    await screenshot('revoked-needs-authorization');
  } else if (scenario === 'denied') {
    await card().locator('button.authorize').click();
    await backOnPage();
    const outcome = card().locator('.authorization-outcome');
    seen.outcome = await outcome.innerText();
    assert.ok(await outcome.evaluate((e) => e.classList.contains('bad')));
    assert.match(seen.outcome, /Last authorization: failed/);
    assert.match(seen.outcome, /declined, or cancelled/);
    assert.match(seen.outcome, /access_denied/);
    assert.equal(await card().getAttribute('data-needs-authorization'), 'true');
    await screenshot('authorization-denied');
  } else {
    throw new Error(`unknown scenario ${scenario}`);
  }
  assert.deepEqual(foreign, [], 'the page loaded third-party assets');
  assert.deepEqual(problems, [], 'the page logged errors');
  console.log(JSON.stringify(seen));
} catch (e) {
  await screenshot('failure').catch(() => {});
  console.error(`page.mjs ${scenario}: ${e.stack || e}`);
  console.error(`at ${page.url()}`);
  console.error((await page.content().catch(() => '')).slice(0, 4000));
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
