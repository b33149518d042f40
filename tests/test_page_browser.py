"""
The status page in a real headless browser (Debian's chromium, driven by
Selenium through Debian's chromium-driver): it shows the hosts of a running
balancer, their configured names, their agreement check, the scale of their
charts and how long each has been in its state, the queue and the fleet's rate; a click on
"drain" shows the host draining; a banner says when no host is up or the
queue is nearly full.  Screenshots are written to artifacts/status-page.png
and artifacts/status-page-alerts.png.

The browser calls block, so they run in a thread while the reactor serves
the page.  chromium must be installed (.ci/run installs it): without it this
test fails, it does not skip.
"""

import shutil
from pathlib import Path

from steering import admin_url, events, status
from support import bounded, rig, rig_with_config, until
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    assert chromium and driver, "the browser test needs Debian's chromium and chromium-driver (.ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,500",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def read_states(driver):
    """
    The state each host row shows, read in one go.
    """
    return driver.execute_script(
        "const s = {};"
        "for (const tr of document.querySelectorAll('#hosts tbody tr[data-host]'))"
        "  s[tr.dataset.host] = tr.querySelector('[data-state]').textContent;"
        "return s;"
    )


def read_agreement(driver):
    """
    The agreement line each host row shows, read in one go.
    """
    return driver.execute_script(
        "const s = {};"
        "for (const tr of document.querySelectorAll('#hosts tbody tr[data-host]'))"
        "  s[tr.dataset.host] = tr.querySelector('[data-agreement]').textContent;"
        "return s;"
    )


def hosts_shown(count):
    """
    A wait condition: the page shows C{count} hosts (their states then).
    """

    def shown(driver):
        states = read_states(driver)
        return states if len(states) == count else False

    return shown


def read_rows(driver):
    """
    What each host row shows: its name and address, its chart's scale, and
    how long it has been in its state.
    """
    return driver.execute_script(
        "const rows = {};"
        "for (const tr of document.querySelectorAll('#hosts tbody tr[data-host]')) {"
        "  const text = s => { const e = tr.querySelector(s); return e ? e.textContent : null; };"
        "  rows[tr.dataset.host] = { name: text('[data-name]'), address: text('[data-address]'),"
        "    top: text('[data-scale-top]'), bottom: text('[data-scale-bottom]'), scale: text('[data-scale]'),"
        "    state: text('[data-state]'), in_state: text('[data-in-state]') };"
        "}"
        "return rows;"
    )


def read_top(driver):
    """
    The banner (its role, whether it shows, its alerts by kind) and the
    balancer's facts, read in one go.
    """
    return driver.execute_script(
        "const banner = document.getElementById('banner');"
        "const alerts = {}, facts = {};"
        "for (const a of banner.querySelectorAll('[data-alert]')) alerts[a.dataset.alert] = a.textContent;"
        "for (const f of document.querySelectorAll('[data-fact]')) facts[f.dataset.fact] = f.textContent;"
        "return { role: banner.getAttribute('role'), shown: banner.offsetHeight > 0, alerts, facts };"
    )


def alert_shown(kind):
    """
    A wait condition: the banner shows an alert of C{kind} (the banner and
    facts then).
    """

    def shown(driver):
        top = read_top(driver)
        return top if top["shown"] and kind in top["alerts"] else False

    return shown


def seconds_of(text):
    """
    The seconds a duration on the page reads (C{"350 ms"}, C{"2.50 s"},
    C{"3 min"}), and how much its rounding may have added (half its last
    digit).
    """
    number, unit = text.split()
    scale = {"ms": 0.001, "s": 1, "min": 60, "h": 3600, "d": 86400}[unit]
    return float(number) * scale, 0.5 * 10 ** -len(number.partition(".")[2]) * scale


@bounded(90)
async def test_the_page_shows_the_hosts_and_a_click_drains_one(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # The third host has other model files: the agreement check holds it out.
    specs = [dict(name="h0"), dict(name="h1"), dict(name="h2", vectors="other-model")]
    async with await rig(specs, "--admin-actions", "--agreement", "on") as r:
        for _ in range(6):
            response = await r.predict()
            await response.content()
        addresses = [h.address for h in r.hosts]
        driver = await deferToThread(browser, tmp_path)
        try:
            await deferToThread(driver.get, admin_url(r) + "/")
            states = await deferToThread(WebDriverWait(driver, 20).until, hosts_shown(3))
            # h2 answered no request: canaries do not count.
            assert states == {addresses[0]: "up", addresses[1]: "up", addresses[2]: "cold"}
            agreement = await deferToThread(read_agreement, driver)
            assert [agreement[a].split()[:2] for a in addresses] == [["clip-visual:", "agrees"]] * 2 + [
                ["clip-visual:", "disagrees"]
            ]
            assert agreement[addresses[2]].endswith(f"with {addresses[0]}")
            strategy = await deferToThread(lambda: driver.find_element(By.CSS_SELECTOR, "[data-fact=strategy]").text)
            assert strategy == "shortest-delay"

            target = addresses[1]
            button = await deferToThread(
                driver.find_element, By.CSS_SELECTOR, f'tr[data-host="{target}"] button[data-action="drain"]'
            )
            await deferToThread(button.click)
            await deferToThread(WebDriverWait(driver, 20).until, lambda d: read_states(d).get(target) == "draining")
            assert r.fleet.backends[1].draining
            assert [e["action"] for e in events(r, "admin-action")] == ["drain"]
            states = await deferToThread(read_states, driver)
            assert states == {addresses[0]: "up", target: "draining", addresses[2]: "cold"}
            # The button now offers to enable it again.
            await deferToThread(
                driver.find_element, By.CSS_SELECTOR, f'tr[data-host="{target}"] button[data-action="enable"]'
            )
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "status-page.png"
            assert await deferToThread(driver.save_screenshot, str(shot))
            assert shot.stat().st_size > 5000
        finally:
            await deferToThread(driver.quit)


@bounded(90)
async def test_with_a_token_the_page_asks_for_it_once(tmp_path):
    """
    With --admin-token, the page asks for the token; once given, the page
    works as without one (its requests carry an HttpOnly, SameSite=Strict
    cookie, not the token), and when the token changes it asks again.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    token = "k3y-0f-the-4dmin"
    async with await rig([dict(name=f"h{i}") for i in range(2)], "--admin-actions", "--admin-token", token) as r:
        target = r.hosts[0].address
        driver = await deferToThread(browser, tmp_path)
        try:
            await deferToThread(driver.get, admin_url(r) + "/")
            field = await deferToThread(driver.find_element, By.NAME, "token")
            assert await deferToThread(read_states, driver) == {}
            await deferToThread(field.send_keys, "wrong")
            await deferToThread(field.submit)
            await deferToThread(WebDriverWait(driver, 20).until, lambda d: "That is not the token" in d.page_source)
            field = await deferToThread(driver.find_element, By.NAME, "token")
            await deferToThread(field.send_keys, token)
            await deferToThread(field.submit)
            states = await deferToThread(WebDriverWait(driver, 20).until, hosts_shown(2))
            assert set(states) == {h.address for h in r.hosts}
            assert token not in await deferToThread(lambda: driver.current_url)
            [cookie] = await deferToThread(driver.get_cookies)
            assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"]) == ("imml-admin", True, "Strict")
            assert token not in cookie["value"]
            assert await deferToThread(driver.execute_script, "return document.cookie") == ""

            button = await deferToThread(
                driver.find_element, By.CSS_SELECTOR, f'tr[data-host="{target}"] button[data-action="drain"]'
            )
            await deferToThread(button.click)
            await deferToThread(WebDriverWait(driver, 20).until, lambda d: read_states(d).get(target) == "draining")
            assert r.fleet.backends[0].draining

            # A new token (a reload): the open page asks for it again.
            r.balancer.guard.set_token("a-n3w-t0ken")
            await deferToThread(WebDriverWait(driver, 20).until, lambda d: d.find_elements(By.NAME, "token"))
        finally:
            await deferToThread(driver.quit)


def named_config(addresses):
    named, plain = addresses
    return (
        f'[[hosts]]\naddress = "{named}"\nname = "studio Mac"\nslots = 1\n[[hosts]]\naddress = "{plain}"\nslots = 1\n'
    )


@bounded(120)
async def test_the_page_shows_names_scales_drain_time_the_queue_and_alerts(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pending = []
    async with await rig_with_config(
        str(tmp_path / "imml.toml"),
        [dict(name="h0"), dict(name="h1")],
        named_config,
        "--admin-actions",
        "--max-queue",
        "10",
    ) as r:
        for _ in range(6):
            response = await r.predict()
            await response.content()
        named, plain = (h.address for h in r.hosts)
        driver = await deferToThread(browser, tmp_path)
        try:
            await deferToThread(driver.get, admin_url(r) + "/")
            await deferToThread(WebDriverWait(driver, 20).until, hosts_shown(2))
            rows = await deferToThread(read_rows, driver)
            # The host named in the configuration shows its name over its
            # address; the other, its address alone.
            assert (rows[named]["name"], rows[named]["address"]) == ("studio Mac", named)
            assert (rows[plain]["name"], rows[plain]["address"]) == (plain, None)

            # Each chart's scale: its top is the most answers in one
            # interval (6 answers in at most two intervals on two hosts:
            # one has 2 or more), its bottom 0, and its interval and span.
            doc = await status(r)
            assert sum(sum(h["throughput"]) for h in doc["hosts"]) == 6
            for h in doc["hosts"]:
                row = rows[h["address"]]
                assert (row["top"], row["bottom"]) == (str(max(1, *h["throughput"])), "0")
                assert row["scale"] == "per 10 s, last 5 min"
            assert max(int(row["top"]) for row in rows.values()) >= 2

            # Drained: "in this state" counts from the drain, not from the
            # last health change (before the browser even started).
            clicked = reactor.seconds()
            button = await deferToThread(
                driver.find_element, By.CSS_SELECTOR, f'tr[data-host="{plain}"] button[data-action="drain"]'
            )
            await deferToThread(button.click)
            await deferToThread(WebDriverWait(driver, 20).until, lambda d: read_states(d).get(plain) == "draining")
            rows = await deferToThread(read_rows, driver)
            drained, rounding = seconds_of(rows[plain]["in_state"])
            assert drained <= reactor.seconds() - clicked + rounding
            assert drained < seconds_of(rows[named]["in_state"])[0]

            # One request on the named host (one slot) and nine waiting, of
            # ten at most: the queue is nearly full.  (OCR: a task the host
            # has no usual time for, so the slow one is not hedged.)
            r.hosts[0].service_time = 60.0
            sent = reactor.seconds()
            pending = [r.predict(task="ocr") for _ in range(10)]
            await until(lambda: r.balancer.dispatcher.queue_depth == 9)
            top = await deferToThread(WebDriverWait(driver, 20).until, alert_shown("queue-nearly-full"))
            assert top["role"] == "alert"
            assert top["alerts"]["queue-nearly-full"].startswith("the queue is nearly full: 9 of 10 requests wait")
            assert "no-host-up" not in top["alerts"]
            assert top["facts"]["waiting"] == "9 of 10"
            oldest, rounding = seconds_of(top["facts"]["oldest wait"])
            assert 0 <= oldest <= reactor.seconds() - sent + rounding
            rate, unit = top["facts"]["rate"].split()
            assert float(rate) > 0 and unit == "answers/s"

            # Every host fails its checks: no host is up.
            for host in r.hosts:
                host.mode = "ping-fail"
            top = await deferToThread(WebDriverWait(driver, 20).until, alert_shown("no-host-up"))
            timeout = r.balancer.dispatcher.queue_timeout
            assert (
                top["alerts"]["no-host-up"]
                == f"no ML host is up: requests wait up to {timeout:g} s for one, then get 503"
            )
            ARTIFACTS.mkdir(exist_ok=True)
            assert await deferToThread(driver.save_screenshot, str(ARTIFACTS / "status-page-alerts.png"))
        finally:
            for d in pending:
                d.addErrback(lambda f: None)
                d.cancel()
            await deferToThread(driver.quit)
