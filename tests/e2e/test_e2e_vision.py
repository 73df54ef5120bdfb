"""Images against the real server (a tiny random LLaVA with SmolLM2's tokenizer and an `<image>` token,
--enable_multimodal): LightLLM's multimodal_params (base64 and url, /generate and /generate_stream) and the
`openai` client's image_url parts (data URL and http URL) give the same greedy text for the same image;
bad data, a placeholder count that differs from the images, too many pixels, failed or slow fetches and a prompt
too long once its images are counted are 400s naming the reason, and the server keeps serving."""

import base64
import http.server
import io
import json
import os
import threading
import time

import openai
import pytest
from e2e_server import running_server
from PIL import Image

from tests.models.llava_helpers import IMAGES, TINY_LLAVA

IMAGE_ID = 49152  # past SmolLM2's 49152 ids
PROMPT = "<image>\nWhat is in the picture?"
PARAMS = {"max_new_tokens": 6}


def tiny_llava_dir(path, smollm2_dir):
    """config.json of a tiny LLaVA over SmolLM2's vocabulary, its tokenizer with `<image>` added, CLIP's
    preprocessor config (weights: --load_format dummy)."""
    from transformers import AutoTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID
    tokenizer.save_pretrained(path)
    text = dict(TINY_LLAVA["text_config"], vocab_size=IMAGE_ID + 64, eos_token_id=2, bos_token_id=1)
    config = dict(TINY_LLAVA, image_token_index=IMAGE_ID, text_config=text)
    (path / "config.json").write_text(json.dumps(config))
    size = TINY_LLAVA["vision_config"]["image_size"]
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(path)


class _Images(http.server.BaseHTTPRequestHandler):
    """Loopback image host: /<name>.png, /slow (answers after 3 s), anything else 404."""

    def do_GET(self):  # noqa: N802
        if self.path == "/slow":
            time.sleep(3)
        name = self.path.strip("/")
        if not (IMAGES / name).is_file():
            self.send_error(404)
            return
        data = (IMAGES / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def vision_server(smollm2_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llava")
    tiny_llava_dir(path, smollm2_dir)
    previous = os.environ.get("REQUEST_TIMEOUT")
    os.environ["REQUEST_TIMEOUT"] = "1"  # the server's URL fetch time-out (LightLLM's variable)
    try:
        flags = ["--load_format", "dummy", "--enable_multimodal", "--cache_capacity", "4", "--eos_id", "2",
                 # fewer step shapes to compile than the other e2e servers
                 "--max_total_token_num", "256", "--batch_max_tokens", "64", "--max_req_input_len", "56",
                 "--max_req_total_len", "64", "--running_max_req_size", "2"]
        server_gen = running_server(path, flags, path / "server.log")
        server = next(server_gen)
    finally:
        if previous is None:
            os.environ.pop("REQUEST_TIMEOUT")
        else:
            os.environ["REQUEST_TIMEOUT"] = previous
    yield server
    server_gen.close()


def b64(name: str) -> str:
    return base64.b64encode((IMAGES / f"{name}.png").read_bytes()).decode()


def generate(server, images, prompt=PROMPT, path="/generate"):
    body = {"inputs": prompt, "parameters": PARAMS, "multimodal_params": {"images": images}}
    return server.stream(path, body) if path == "/generate_stream" else server.post(path, body)


def test_lightllm_base64_url_and_stream_agree(vision_server, image_host):
    status, by_b64 = generate(vision_server, [{"type": "base64", "data": b64("chelsea")}])
    assert status == 200, by_b64
    status, by_url = generate(vision_server, [{"type": "url", "data": f"{image_host}/chelsea.png"}])
    assert status == 200 and by_url["generated_text"] == by_b64["generated_text"]
    assert by_b64["prompt_tokens"] > 9  # the image's 9 tokens and the text's
    status, events = generate(vision_server, [{"type": "base64", "data": b64("chelsea")}], path="/generate_stream")
    assert status == 200 and "".join(e["token"]["text"] for e in events) == by_b64["generated_text"][0]
    status, other = generate(vision_server, [{"type": "base64", "data": b64("coffee")}])
    assert status == 200 and other["prompt_tokens"] == by_b64["prompt_tokens"]
    status, last = generate(vision_server, [{"type": "base64", "data": b64("coffee")}], prompt="Describe: <image>")
    assert status == 200 and last["count_output_tokens"] == PARAMS["max_new_tokens"]  # an image ends the prompt


def test_openai_client_sends_an_image(vision_server, image_host):
    client = openai.OpenAI(base_url=vision_server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    answers = []
    for url in (f"data:image/png;base64,{b64('astronaut')}", f"{image_host}/astronaut.png"):
        reply = client.chat.completions.create(model="tiny-llava", max_tokens=6, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in the picture?"}]}])
        answers.append(reply.choices[0].message.content)
        assert reply.usage.prompt_tokens > 9
    assert answers[0] == answers[1]
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\].content\[0\]"):
        client.chat.completions.create(model="tiny-llava", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}]}])


def huge_png() -> str:
    buffer = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("images, prompt, fragment", [
    ([{"type": "base64", "data": "not base64!"}], PROMPT, "multimodal_params.images[0]: not valid base64"),
    ([{"type": "base64", "data": base64.b64encode(b"no image").decode()}], PROMPT, "images[0]: not an image"),
    ([{"type": "base64", "data": "x"}] * 2, PROMPT, "1 image placeholders (<image>) for 2 images"),
    ([{"type": "file", "data": "x"}], PROMPT, "multimodal_params.images[0]: expected"),
    ([{"type": "url", "data": "{host}/missing.png"}], PROMPT, "images[0]: fetching"),
    ([{"type": "url", "data": "{host}/slow"}], PROMPT, "took longer than 1 s"),
    ("huge", PROMPT, "pixels is more than"),
    # 4 images × 9 tokens + the text: within --max_req_input_len 56 as text, past it with the images (the
    # frontend counts them before the request crosses to the engine core)
    ("four", "<image>" * 4 + " What is in the picture?" * 4, "more than --max_req_input_len 56"),
])
def test_bad_images_are_400_naming_the_image(vision_server, image_host, images, prompt, fragment):
    if images == "huge":
        images = [{"type": "base64", "data": huge_png()}]
    if images == "four":
        images = [{"type": "base64", "data": b64(name)} for name in ("chelsea", "coffee", "astronaut", "camera")]
    images = [dict(i, data=i["data"].replace("{host}", image_host)) for i in images]
    status, out = generate(vision_server, images, prompt)
    assert status == 400 and fragment in out["message"], out
    status, out = generate(vision_server, [{"type": "base64", "data": b64("camera")}])
    assert status == 200  # still serving
