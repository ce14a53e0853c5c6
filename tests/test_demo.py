"""Demo spec: merged models in-process; the app in a subprocess on 127.0.0.1 serves /generate to `gradio_client`,
to 32 concurrent clients and to a real headless Chromium, and refuses what it must with a clear message."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest
import torch
from conftest import perturb_adapters, tiny_llama
from transformers import AutoTokenizer

from hf_lorafa import LoRAFAConfig, inject_adapters, load_adapter, save_adapter
from hf_lorafa.cli.demo import BASE, DEFAULT_ADAPTER_DIR, load_models, main, parse_args
from hf_lorafa.cli.demo_models import adapter_facts
from hf_lorafa.data.offline import smollm2_path

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
MAX_NEW, MAX_CHARS = 16, 200
FACTS = {"trainable_parameters": 4096, "total_parameters": 6_400_000, "memory": {"peak_bytes": 3 * 2**20}}


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer (so it has a chat template) and a LoRA-FA adapter for it."""
    root = tmp_path_factory.mktemp("demo")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    base = tiny_llama(vocab=len(tokenizer))
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapted = inject_adapters(copy.deepcopy(base), LoRAFAConfig(method="lorafa", r=4))
    perturb_adapters(adapted, scale=0.5)
    save_adapter(adapted, root / "tiny-adapter", extra=FACTS)
    return root / "base", root / "tiny-adapter"


def test_each_adapter_is_merged_into_its_own_model(assets):
    base_dir, adapter_dir = assets
    tokenizer, models = load_models(str(base_dir), [str(adapter_dir)])
    assert list(models) == ["base", "tiny-adapter"] and tokenizer.chat_template
    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(0))
    reference = load_adapter(copy.deepcopy(models[BASE].model), adapter_dir)  # unmerged, same weights
    with torch.no_grad():
        merged, unmerged, base = (m(ids).logits for m in (models["tiny-adapter"].model, reference, models[BASE].model))
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(merged, base, atol=1e-3)  # the adapter changes the model; the base stays the base
    facts = models["tiny-adapter"].facts
    assert (facts["Method"], facts["Rank"], facts["Peak memory"]) == ("lorafa", 4, "3.0 MiB (peak)")
    assert facts["Trainable params"].startswith("4,096 (0.06%")


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"hf_lorafa.json": {"method": "lamda"}}, {"Method": "lamda"}),
        ({"hf_lorafa.json": {"config": {"r": 8}, "memory": {}, "results": {"eval_loss": 1.5}}}, {"Rank": 8}),
        ({"adapter_config.json": {"r": 16, "base_model_name_or_path": "m"}}, {"Method": "lora (PEFT)", "Rank": 16}),
        ({}, {}),
    ],
)
def test_adapter_facts_tolerate_missing_keys(tmp_path, files, expected):
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    facts = adapter_facts(tmp_path)
    assert expected.items() <= facts.items()
    assert None not in facts.values()


@pytest.mark.parametrize(
    "env, has_default_dir, expected",
    [
        ({"HF_LORAFA_ADAPTERS": "a/b, c  d"}, True, ["a/b", "c", "d"]),
        ({}, True, [DEFAULT_ADAPTER_DIR]),
        ({}, False, []),
        ({"HF_LORAFA_ADAPTERS": ""}, True, []),
    ],
)
def test_adapters_from_env_or_default_dir(tmp_path, monkeypatch, env, has_default_dir, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_LORAFA_ADAPTERS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if has_default_dir:
        (tmp_path / DEFAULT_ADAPTER_DIR).mkdir(parents=True)
    assert parse_args([]).adapters == expected
    assert parse_args(["--adapter", "x"]).adapters == ["x"]


def test_wrong_adapter_path_is_a_clear_error(assets, tmp_path):
    with pytest.raises(SystemExit, match="hf-lorafa demo: error: `adapter`=.* is neither an adapter folder"):
        main(["--base-model", str(assets[0]), "--adapter", str(tmp_path / "missing")])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(assets, tmp_path_factory):
    """`python spaces_demo/app.py ...` in a subprocess; always terminated, with bounded waits."""
    base_dir, adapter_dir = assets
    port, log_path = _free_port(), tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, str(ROOT / "spaces_demo" / "app.py"), "--base-model", str(base_dir)]
    command += ["--adapter", str(adapter_dir), "--host", "127.0.0.1", "--port", str(port), "--concurrency", "4"]
    command += ["--max-new-tokens", str(MAX_NEW), "--max-prompt-chars", str(MAX_CHARS)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the demo server did not start (exit {process.poll()}):\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def _greedy(client, prompt: str, model: str = "tiny-adapter") -> str:
    return client.predict(prompt, model, 8, 0, api_name="/generate")


def test_generate_endpoint_and_comparison(server):
    client = _client(server)
    answer = client.predict("Hello, who are you?", api_name="/generate")  # every other input has a default
    assert isinstance(answer, str) and answer.strip()
    adapted, base = _greedy(client, "Hi"), _greedy(client, "Hi", "base")
    assert adapted.strip() and base.strip() and adapted != base
    assert client.predict("Hi", "tiny-adapter", 8, 0, api_name="/compare") == (base, adapted)
    job = client.submit("Hi", "tiny-adapter", 8, 0, api_name="/generate")
    job.result(timeout=60)
    pieces = job.outputs()  # streamed: a growing text, one update per decoded piece
    assert len(pieces) > 2 and pieces[-1] == adapted
    assert all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:]))


def test_32_concurrent_clients_all_answered(server):
    prompts = [f"Question number {i}?" for i in range(4)]
    expected = {p: _greedy(_client(server), p) for p in prompts}
    start = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(lambda p: _greedy(_client(server), p), prompts[i % 4]) for i in range(32)]
        done, pending = wait(futures, timeout=90)
    assert not pending, f"{len(pending)} of 32 requests still unanswered after 90 s"
    # Each client gets its own prompt's answer: none dropped, none crossed with another request.
    assert [f.result() for f in futures] == [expected[prompts[i % 4]] for i in range(32)]
    assert time.monotonic() - start < 90


@pytest.mark.parametrize(
    "args, message",
    [
        (("x" * (MAX_CHARS + 1),), f"is {MAX_CHARS + 1} characters; the limit is {MAX_CHARS}"),
        (("   ",), "The prompt is empty"),
        (("1234567890" * 19,), "exceeds the model's context of 128 tokens"),
        (("Hi", "tiny-adapter", MAX_NEW + 1, 0), f"greater than maximum value {MAX_NEW}"),
        (("Hi", "tiny-adapter", "nan", 0), f"max_new_tokens must be a whole number between 1 and {MAX_NEW}"),
        (("Hi", "tiny-adapter", 2.5, 0), f"max_new_tokens must be a whole number between 1 and {MAX_NEW}"),
        (("Hi", "tiny-adapter", 8, "inf"), "temperature must be a number between 0 and 2"),
        (("Hi", "/etc/passwd", 8, 0), "not in the list of choices"),  # no paths from the page
    ],
)
def test_refusals_have_clear_messages(server, args, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        _client(server).predict(*args, api_name="/generate")


def _settled(page, read, quiet_s: float = 1.5) -> str:
    """The text `read` returns once it is non-empty and has not changed for `quiet_s` (the stream ended)."""
    seen = {"text": None, "since": 0.0}

    def check(driver):
        text = read(driver)
        if text != seen["text"]:
            seen.update(text=text, since=time.monotonic())
        return text.strip() and time.monotonic() - seen["since"] >= quiet_s and text

    return page.until(check)


@pytest.mark.browser
def test_real_browser_gets_an_answer(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, chromedriver = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
    if not (chromium.exists() and chromedriver.exists()):
        pytest.fail("Debian's chromium and chromium-driver are missing; install them with `make browser`.")
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        options.add_argument(flag)
    for flag in ("--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    options.add_argument("--window-size=1280,900")
    driver = webdriver.Chrome(service=Service(str(chromedriver)), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(server)
        page = WebDriverWait(driver, 60, poll_frequency=0.25)
        body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
        prompt = page.until(lambda d: d.find_element(By.CSS_SELECTOR, "#generate-prompt textarea"))
        assert "lorafa" in page.until(lambda d: "Method" in body(d) and body(d))  # the card facts beside the model
        prompt.send_keys("What does LoRA-FA freeze?")
        driver.find_element(By.CSS_SELECTOR, "#generate-btn").click()
        output = lambda d: d.find_element(By.CSS_SELECTOR, "#output textarea").get_attribute("value")  # noqa: E731
        assert _settled(page, output)  # streamed in, then finished: the screenshot shows the whole answer
        ARTIFACTS.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "demo.png"))
        prompt.clear()
        prompt.send_keys("x" * (MAX_CHARS + 1))
        driver.find_element(By.CSS_SELECTOR, "#generate-btn").click()
        assert page.until(lambda d: f"the limit is {MAX_CHARS}" in body(d))  # shown on the page, no traceback
        assert "Traceback" not in body(driver)
        driver.save_screenshot(str(ARTIFACTS / "demo-error.png"))
        for close in driver.find_elements(By.CSS_SELECTOR, ".toast-close"):  # dismiss the error before comparing
            close.click()
        driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Compare')]").click()
        page.until(lambda d: d.find_element(By.CSS_SELECTOR, "#compare-prompt textarea").is_displayed())
        driver.find_element(By.CSS_SELECTOR, "#compare-prompt textarea").send_keys("Hi")
        driver.find_element(By.CSS_SELECTOR, "#compare-btn").click()
        side = lambda d, s: d.find_element(By.CSS_SELECTOR, f"#compare-{s} textarea").get_attribute("value")  # noqa: E731
        assert page.until(lambda d: side(d, "base").strip() and side(d, "adapter").strip())
        _settled(page, lambda d: side(d, "adapter"))  # both answers, side by side
        driver.save_screenshot(str(ARTIFACTS / "demo-compare.png"))
    finally:
        driver.quit()
