"""Review of the model adapters and the reward models: one regression test per bug found (each fails on the old code)."""

from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from flowalign.errors import UserError
from tiny_models import TINY_SIZES

# --------------------------------------------------------------------------------------------------
# FLUX: a scheduler without dynamic shifting (FLUX.1-schnell) keeps its static shift


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flux_static_shift_scheduler_samples_like_fluxpipeline(shift):
    """FLUX.1-schnell's scheduler has ``use_dynamic_shifting=False``: FluxPipeline passes μ but the scheduler ignores it
    and applies its static shift. The adapter used the dynamic (μ) grid for every FLUX model, so schnell sampled on the
    wrong sigmas; with a no-guidance-embedding transformer the whole Euler run must equal the pipeline's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from flowalign.models.flux import FluxModel
    from flowalign.samplers import sample
    from tiny_models import tiny_flux_pipeline

    src = tiny_flux_pipeline()
    torch.manual_seed(1)
    transformer = FluxTransformer2DModel(  # schnell-like: no guidance embedding
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    ).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False),
                        vae=src.vae, text_encoder=src.text_encoder, tokenizer=src.tokenizer,
                        text_encoder_2=src.text_encoder_2, tokenizer_2=src.tokenizer_2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    model = FluxModel(pipe, max_sequence_length=16, **TINY_SIZES["flux"])
    prompts = ["a red cat", "two small yellow stars"]
    x0 = model.init_noise(2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = pipe(prompts, latents=x0.clone(), num_inference_steps=3, max_sequence_length=16, output_type="latent",
                   **TINY_SIZES["flux"]).images
        sigmas = model.schedule(3)
        assert torch.allclose(sigmas, pipe.scheduler.sigmas.float(), atol=1e-6, rtol=0), (sigmas, pipe.scheduler.sigmas)
        final = sample(model.velocity, x0, sigmas, model.encode(prompts), eta=0.0, kernel="euler").final
    assert torch.allclose(final, ref, atol=2e-5, rtol=0), (final - ref).abs().max()


# --------------------------------------------------------------------------------------------------
# shapes model: the timestep reaches the transformer in fp32 whatever the model dtype


def test_shapes_bf16_model_gets_the_exact_fp32_timestep(tmp_path):
    """A bf16 shapes model passed ``(1000·σ).to(bf16)``: 999 became 1000 (bf16 spacing is 4 above 512), so the
    sinusoidal timestep embedding saw the wrong time. SD3 (and the fp32 shapes model) pass the exact fp32 1000·σ."""
    from flowalign.models.shapes import ShapesModel

    tiny = dict(vocab=["a", "red", "blue", "circle", "square"], image_size=8, patch_size=4, num_layers=1, num_heads=2,
                head_dim=8, text_dim=16, text_layers=1, text_heads=2, max_len=4, pooled_dim=16)
    torch.manual_seed(0)
    ShapesModel.from_config(tiny).save_pretrained(tmp_path)
    model = ShapesModel.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    seen = []
    model.transformer.time_text_embed.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    cond = model.encode(["a red circle"])
    x = model.init_noise(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = model.velocity(x, torch.tensor(0.999), cond)
    assert v.dtype == torch.float32
    t = torch.cat(seen)
    assert t.dtype == torch.float32, t.dtype
    assert torch.equal(t, torch.full_like(t, 1000.0 * torch.tensor(0.999).item())), t


# --------------------------------------------------------------------------------------------------
# remote reward: protocol robustness


class _Const:
    name = "const"
    differentiable = False
    kind = "image"

    def __call__(self, images, prompts, metadata=None):
        return torch.ones(images.shape[0])


def test_reward_server_answers_a_negative_content_length_at_once():
    """``Content-Length: -1`` made the handler call ``rfile.read(-1)``, which waits for the client to close the
    connection: the client hung (until the 120 s handler timeout) instead of getting a 400."""
    from flowalign.rewards.remote import serve

    with serve(_Const()) as srv:
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
        conn.putrequest("POST", "/score")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", "-1")
        conn.endheaders()
        resp = conn.getresponse()  # old code: socket timeout here
        assert resp.status == 400
        assert "Content-Length" in json.loads(resp.read())["error"]
        conn.close()


class _FakeServer:
    """A stdlib HTTP server answering every POST with a fixed (bad) reply; counts the requests."""

    def __init__(self, reply):
        self.calls = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                outer.calls += 1
                self.rfile.read(int(self.headers["Content-Length"]))
                reply(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _html(handler):
    body = b"<html><body>not a reward server</body></html>"
    handler.send_response(200)
    handler.send_header("Content-Type", "text/html")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _truncated(handler):
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", "100")
    handler.end_headers()
    handler.wfile.write(b'{"scores": [')  # the connection closes before the announced 100 bytes
    handler.close_connection = True


def test_remote_client_non_json_reply_is_a_one_line_user_error():
    """A 200 reply that is not JSON (another service on that port) raised a bare JSONDecodeError."""
    from flowalign.rewards.remote import RemoteReward

    fake = _FakeServer(_html)
    try:
        with pytest.raises(UserError, match="not JSON"):
            RemoteReward(fake.url, retries=0, timeout=5)(torch.rand(2, 3, 8, 8), ["a", "b"])
    finally:
        fake.close()


def test_remote_client_retries_a_cut_reply_then_gives_a_user_error():
    """A reply cut short (http.client.IncompleteRead, an HTTPException rather than an OSError) escaped the retry loop
    as a raw exception on the first attempt; it is a transient failure like a reset connection."""
    from flowalign.rewards.remote import RemoteReward

    fake = _FakeServer(_truncated)
    try:
        with pytest.raises(UserError, match="unreachable after 2 attempts"):
            RemoteReward(fake.url, retries=1, backoff=0.0, timeout=5)(torch.rand(2, 3, 8, 8), ["a", "b"])
        assert fake.calls == 2
    finally:
        fake.close()


# --------------------------------------------------------------------------------------------------
# shapes model: default LoRA targets exist in every configuration


def test_shapes_one_layer_model_takes_the_default_lora():
    """With ``num_layers=1`` the only MMDiT block is context_pre_only and has no ``to_add_out``; the default target
    list named it anyway, so ``add_lora()`` raised "no module ... matches the LoRA target(s) ['to_add_out']"."""
    from flowalign.models.shapes import SHAPES_LORA_TARGETS, ShapesModel

    tiny = dict(vocab=["a", "red", "circle"], image_size=8, patch_size=4, num_layers=1, num_heads=2, head_dim=8,
                text_dim=16, text_layers=1, text_heads=2, max_len=4, pooled_dim=16)
    torch.manual_seed(0)
    model = ShapesModel.from_config(tiny)
    params = model.add_lora()
    assert params and set(model.lora_targets) == set(SHAPES_LORA_TARGETS) - {"to_add_out"}
    deeper = ShapesModel.from_config(dict(tiny, num_layers=2))
    assert deeper.lora_targets == SHAPES_LORA_TARGETS  # unchanged where every target exists


def test_a_missing_local_path_shaped_like_a_hub_id_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """`path=weights/PickScore_v1` with a `weights/` directory here but no such subdirectory: a missing local path
    (one line at once), not a hub id (which waited on the network, then suggested a download)."""
    from flowalign.errors import UserError
    from flowalign.rewards.base import hub_file, is_hub_id, resolve_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    assert not is_hub_id("weights/PickScore_v1") and is_hub_id("yuvalkirstain/PickScore_v1")
    with pytest.raises(UserError, match="'weights/PickScore_v1' does not exist"):
        resolve_source("weights/PickScore_v1", "pickscore model")
    with pytest.raises(UserError, match="does not exist"):
        hub_file("weights/hps", "xswu/HPSv2", "HPS_v2_compressed.pt", "hps checkpoint", "checkpoint")
