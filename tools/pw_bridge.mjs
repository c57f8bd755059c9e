// A tiny line-JSON bridge from pytest to playwright-core: one request per stdin line
// {"id", "op", "args"}, one reply per stdout line {"id", "ok", "result" | "error"}.
// Launched by tools/browser_bridge.py with PLAYWRIGHT_CORE (module path) and CHROMIUM (executable).
import readline from "node:readline";

const { chromium } = await import(process.env.PLAYWRIGHT_CORE);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM,
  args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
});
const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
const page = await context.newPage();
const logs = [];
page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));

const call = (src, arg) => `(${src})(${JSON.stringify(arg ?? null)})`;
const ops = {
  goto: ({ url }) => page.goto(url, { waitUntil: "load" }).then(() => null),
  evaluate: ({ src, arg }) => page.evaluate(call(src, arg)),
  waitFor: ({ src, arg, timeout }) =>
    page.waitForFunction(call(src, arg), null, { timeout: timeout ?? 30000, polling: 100 }).then((h) => h.jsonValue()),
  mouse: async ({ steps }) => {
    for (const s of steps) {
      if (s.op === "move") await page.mouse.move(s.x, s.y, { steps: s.steps ?? 1 });
      else if (s.op === "down") await page.mouse.down();
      else if (s.op === "up") await page.mouse.up();
    }
    return null;
  },
  click: ({ selector }) => page.click(selector).then(() => null),
  press: ({ key }) => page.keyboard.press(key).then(() => null),
  type: ({ text }) => page.keyboard.type(text, { delay: 20 }).then(() => null),
  dblclick: ({ x, y }) => page.mouse.dblclick(x, y).then(() => null),
  box: ({ selector }) => page.locator(selector).first().boundingBox(),
  screenshot: ({ path, clip }) => page.screenshot({ path, clip: clip ?? undefined }).then(() => path),
  viewport: ({ width, height }) => page.setViewportSize({ width, height }).then(() => null),
  logs: () => logs.splice(0),
  close: async () => { await browser.close(); setTimeout(() => process.exit(0), 10); return null; },
};

const rl = readline.createInterface({ input: process.stdin });
for await (const line of rl) {
  if (!line.trim()) continue;
  const { id, op, args } = JSON.parse(line);
  let reply;
  try {
    reply = { id, ok: true, result: (await ops[op](args ?? {})) ?? null };
  } catch (e) {
    reply = { id, ok: false, error: String(e?.stack || e) };
  }
  process.stdout.write(JSON.stringify(reply) + "\n");
}
await browser.close();
