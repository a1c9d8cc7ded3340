// Drives the OHIF viewer in headless Chromium (playwright-core) against a running archive.
// usage: node check.cjs PLAYWRIGHT_CORE_DIR VIEWER_URL STUDY_UID PATIENT_TEXT SCREENSHOT_DIR
// Prints one JSON line: {"studyList": bool, "canvas": {...}, "errors": [...]}.
const [playwrightDir, viewer, studyUid, patientText, shots] = process.argv.slice(2);
const { chromium } = require(playwrightDir);

async function canvasStats(page) {
  // Cornerstone3D draws each viewport on a 2D canvas: read its pixels and measure variety.
  return page.evaluate(() => {
    const stats = [];
    for (const canvas of document.querySelectorAll('canvas')) {
      const { width, height } = canvas;
      if (width < 32 || height < 32) continue;
      let ctx = null;
      try { ctx = canvas.getContext('2d'); } catch (e) { ctx = null; }
      if (!ctx) continue;
      const data = ctx.getImageData(0, 0, width, height).data;
      const seen = new Set();
      let lit = 0;
      for (let i = 0; i < data.length; i += 16) {
        const v = data[i] + data[i + 1] + data[i + 2];
        seen.add(v);
        if (v > 30) lit += 1;
      }
      stats.push({ width, height, distinct: seen.size, litFraction: lit / (data.length / 16) });
    }
    return stats;
  });
}

(async () => {
  const out = { studyList: false, canvas: null, errors: [] };
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader',
           '--ignore-gpu-blocklist', '--disable-dev-shm-usage'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    page.on('pageerror', e => out.errors.push(String(e).slice(0, 300)));
    await page.goto(viewer + '/', { waitUntil: 'load', timeout: 120000 });
    await page.getByText(patientText, { exact: false }).first().waitFor({ timeout: 90000 });
    out.studyList = true;
    await page.screenshot({ path: shots + '/ohif-study-list.png' });
    await page.goto(viewer + '/viewer?StudyInstanceUIDs=' + studyUid,
                    { waitUntil: 'load', timeout: 120000 });
    const deadline = Date.now() + 120000;
    while (Date.now() < deadline) {
      const stats = await canvasStats(page);
      const best = stats.sort((a, b) => b.distinct - a.distinct)[0];
      if (best && best.distinct > 20 && best.litFraction > 0.05) { out.canvas = best; break; }
      out.canvas = best || null;
      await page.waitForTimeout(1000);
    }
    await page.screenshot({ path: shots + '/ohif-viewer.png' });
  } catch (e) {
    out.errors.push(String(e).slice(0, 500));
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
})();
