"""The Gradio page: three tabs (Generate, Train, Library) wired to ``Studio`` methods; no model logic here.

Every callback goes through ``_ui`` so a failure shows as a readable message in the page (``gr.Error``), never
a traceback. Training runs in the Studio's background thread; the page polls it with a ``gr.Timer``.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool

import gradio as gr  # noqa: E402

from stylelora.errors import StyleloraError  # noqa: E402
from stylelora.blend import MAX_WEIGHT  # noqa: E402
from stylelora.blocks import PRESETS as BLOCK_PRESETS  # noqa: E402
from stylelora.generate import SAMPLERS  # noqa: E402
from stylelora.presets import WEBUI_DEFAULT, for_base, is_toy_base  # noqa: E402

from .handlers import RESIZE_RULES, GenerateRequest, GridRequest, Studio, insert_triggers, parse_values  # noqa: E402
from .library import TABLE_HEADERS  # noqa: E402
from stylelora.config import SCHEDULERS  # noqa: E402

from .training import MAX_BATCH, MAX_RANK, MAX_SAMPLE_STEPS, MAX_STEPS, PRESETS, TrainRequest  # noqa: E402
from .training import format_status, loss_frame, max_resolution, sample_caption  # noqa: E402

log = logging.getLogger(__name__)
SOURCES = ("Folder on the server", "Upload images")
GALLERY_HEIGHT = 520
RESIZE_EXAMPLES = {"rank": "8", "energy": "0.9", "ratio": "4", "cumulative": "0.9", "budget": "1M", "max error": "0.05"}


# Layout fixes found in Chromium (issue 20), each held by a test in tests/test_webui_browser.py:
# - status lines: Gradio's "Error" badge sits over the middle of the component it reports on; it goes to the right
#   end and the text keeps room before it, so neither covers the other.
# - the library table: columns share the width (hash and size were pushed out of view at 1024 px) and headers
#   never break inside a word ("fami ly").
# - the gallery: no picture is taller than the gallery's own box, so an X/Y grid is shown whole (object-fit:
#   contain inside a square thumbnail taller than the box cut its bottom off).
# - small pictures (the toy base's 64 px images) are enlarged with pixelated scaling instead of a blur; the script
#   marks every image of at most 256 px a side when it loads (CSS cannot see an image's own size).
SMALL_IMAGE = 256
PAGE_CSS = f"""
.status-line .wrap {{ align-items: flex-end !important; }}
.status-line .wrap .error {{ margin-right: 32px; }}
.status-line .prose {{ padding-right: 120px; }}
#library-table th, #library-table td {{ overflow-wrap: normal; word-break: normal; }}
#library-table th {{ white-space: nowrap; }}
#library-table td {{ overflow-wrap: anywhere; }}
#gallery .thumbnail-item {{ max-height: {GALLERY_HEIGHT - 48}px; }}
img.stylelora-small {{ image-rendering: pixelated; }}
"""
PAGE_HEAD = f"""<script>
document.addEventListener("load", (e) => {{
  const img = e.target;
  if (img instanceof HTMLImageElement)
    img.classList.toggle("stylelora-small", img.naturalWidth <= {SMALL_IMAGE} && img.naturalHeight <= {SMALL_IMAGE});
}}, true);
</script>"""
PAGE_STYLE = {"css": PAGE_CSS, "head": PAGE_HEAD}
_LAUNCH_STYLES = "css" in inspect.signature(gr.Blocks.launch).parameters  # Gradio 6 moved css/head to launch()


def _ui(fn):
    """Show library errors as their message, anything unexpected as a one-line message (traceback to the log)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as e:  # our own "pick an adapter first": a message for the page, no traceback in the log
            e.print_exception = False
            raise
        except StyleloraError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - the page gets a message, the server log the traceback
            log.exception("web UI action %s failed", fn.__name__)
            raise gr.Error(f"Unexpected error ({type(e).__name__}): {e}", print_exception=False) from None
    return wrapper


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name)


def _progress(progress: gr.Progress):
    # every caller counts images (generate, grid cells); gradio's default unit would say "steps"
    return lambda done, total, what: progress((done, total), desc=what, unit="images")


# ---------------------------------------------------------------------------------------------- Generate
def _generate_tab(studio: Studio, c: SimpleNamespace) -> None:
    native = studio.native_size
    with gr.Row():
        with gr.Column(scale=5):
            c.picked = gr.Dropdown(studio.adapters(), value=[], multiselect=True, label="Adapters",
                                   info="pick adapters from the library; each gets its own weight",
                                   allow_custom_value=True, elem_id="adapters", interactive=True)
            with gr.Row(equal_height=True):
                c.triggers = gr.Markdown("", elem_id="trigger-words")
                c.insert_triggers = gr.Button("Insert trigger words", size="sm", scale=0, visible=False,
                                              elem_id="insert-triggers")
            _weight_rows(studio, c)
            c.prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", interactive=True,
                                  placeholder="a lighthouse at dusk (A1111 <lora:name:w> tags work too)")
            c.negative = gr.Textbox(label="Negative prompt", elem_id="negative", interactive=True)
            with gr.Row():
                c.seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, elem_id="seed", interactive=True,
                                   scale=3)
                c.random_seed = gr.Button("Random", size="sm", scale=1, elem_id="seed-random")
                c.reuse_seed = gr.Button("Reuse last", size="sm", scale=1, elem_id="seed-reuse")
            with gr.Row():
                c.steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="steps", interactive=True)
                c.guidance = gr.Slider(0, 20, value=7, step=0.5, label="Guidance (CFG)", elem_id="guidance",
                                       interactive=True)
            with gr.Row():
                c.width = gr.Slider(64, 2048, value=native, step=8, label="Width", elem_id="width", interactive=True)
                c.height = gr.Slider(64, 2048, value=native, step=8, label="Height", elem_id="height", interactive=True)
            with gr.Row():
                c.sampler = gr.Dropdown(["default", *SAMPLERS], value="default", label="Scheduler", elem_id="sampler",
                                        interactive=True)
                c.num_images = gr.Slider(1, 16, value=1, step=1, label="Images", elem_id="num-images", interactive=True)
            c.generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
            c.gen_status = gr.Markdown("", elem_id="gen-status", min_height=24, elem_classes=["status-line"])
            with gr.Accordion("X/Y grid", open=False, elem_id="xy-grid"):
                gr.Markdown("Columns sweep one adapter's weight; rows sweep seeds or a second adapter. The other "
                            "picked adapters keep their weights.")
                with gr.Row():
                    c.x_adapter = gr.Dropdown(studio.adapters(), value=None, label="X: adapter",
                                              allow_custom_value=True, elem_id="x-adapter", interactive=True)
                    c.x_values = gr.Textbox("0, 0.25, 0.5, 0.75, 1", label="X: weights (a, b, … or start:stop:step)",
                                            elem_id="x-values", interactive=True)
                with gr.Row():
                    c.y_kind = gr.Radio(["seed", "adapter", "none"], value="seed", label="Y axis", elem_id="y-kind",
                                        interactive=True)
                    c.y_adapter = gr.Dropdown(studio.adapters(), value=None, label="Y: adapter",
                                              allow_custom_value=True, elem_id="y-adapter", interactive=True)
                    c.y_values = gr.Textbox("1, 2, 3", label="Y: seeds or weights", elem_id="y-values",
                                            interactive=True)
                c.grid_btn = gr.Button("Generate grid", elem_id="grid-btn")
        with gr.Column(scale=6):
            c.gallery = gr.Gallery(label="Images", columns=2, height=GALLERY_HEIGHT, elem_id="gallery",
                                   object_fit="contain", buttons=["download", "fullscreen"], interactive=False)
            c.infotext = gr.Textbox(label="Settings (the PNG's parameters)", lines=5, interactive=False,
                                    elem_id="infotext", buttons=["copy"])
            c.files = gr.File(label="Download PNGs", file_count="multiple", interactive=False, elem_id="downloads")
    c.last_seed = gr.State(None)
    c.texts = gr.State([])

    @_ui
    def show_triggers(names):
        words = studio.trigger_words(names)
        shown = "; ".join(f"**{n}**: `{t.replace('`', '')}`" for n, t in words.items())
        text = f"Trigger words: {shown}" if words else ""
        return text, gr.Button(visible=bool(words))

    @_ui
    def insert(names, prompt):
        # on the toy tiny base after the prompt, where its training captions have them: in front, the bare base
        # drew stripes for "strpz, <prompt>" (8 of 12 held-out pictures) and got the content wrong (7 of 12)
        return insert_triggers(prompt, studio.trigger_words(names).values(), at_end=is_toy_base(studio.base.spec))

    c.picked.change(show_triggers, c.picked, [c.triggers, c.insert_triggers], queue=False)
    c.insert_triggers.click(insert, [c.picked, c.prompt], c.prompt, queue=False)


def _weight_rows(studio: Studio, c: SimpleNamespace) -> None:
    """One weight row per picked adapter (re-rendered when the pick changes); Generate and grid read them."""

    def request(d: dict, weights: dict, blocks: dict) -> GenerateRequest:
        return GenerateRequest(prompt=d[c.prompt], negative_prompt=d[c.negative], adapters=weights, blocks=blocks,
                               seed=int(d[c.seed] if d[c.seed] is not None else -1), steps=int(d[c.steps]),
                               guidance=float(d[c.guidance]), width=int(d[c.width]), height=int(d[c.height]),
                               sampler=d[c.sampler], num_images=int(d[c.num_images]))

    @gr.render(inputs=[c.picked], triggers=[c.picked.change, c.demo.load])
    def weight_rows(names):
        rows = []
        for name in names or []:
            with gr.Row(equal_height=True):
                w = gr.Slider(-MAX_WEIGHT, MAX_WEIGHT, value=1.0, step=0.05, label=f"{name}: weight", key=f"w:{name}",
                              elem_id=f"w-{_slug(name)}", scale=4, interactive=True)
                sep = gr.Checkbox(False, label="own TE weight", key=f"sep:{name}",
                                  elem_id=f"sep-{_slug(name)}", scale=1, min_width=120, interactive=True)
                te = gr.Slider(-MAX_WEIGHT, MAX_WEIGHT, value=1.0, step=0.05, label=f"{name}: text-encoder weight",
                               key=f"te:{name}",
                               elem_id=f"te-{_slug(name)}", scale=3, visible=False, interactive=True,
                               preserved_by_key=["value", "visible"])
                sep.change(lambda on: gr.Slider(visible=on), sep, te, queue=False)
                # block weights (A1111's LoRA Block Weight): a preset or a typed comma list, checked on Generate
                bl = gr.Dropdown(list(BLOCK_PRESETS), value=None, allow_custom_value=True, label=f"{name}: blocks",
                                 info="empty: all 1; a preset or 17 (SD1/2) / 12 (SDXL) values",
                                 key=f"bl:{name}", elem_id=f"blocks-{_slug(name)}", scale=2, min_width=160,
                                 interactive=True)
            rows.append((name, w, sep, te, bl))

        def weights(d: dict) -> dict:
            return {n: (d[w], d[te]) if d[sep] else d[w] for n, w, sep, te, _ in rows}

        def blocks(d: dict) -> dict:
            return {n: d[bl] for n, *_, bl in rows if d[bl] and str(d[bl]).strip()}

        @_ui
        def run(d, progress=gr.Progress()):
            start = time.time()
            res = studio.generate(request(d, weights(d), blocks(d)), progress=_progress(progress))
            gallery = [(str(p), f"seed {res.seed + i}") for i, p in enumerate(res.paths)]
            done = f"{len(res.paths)} image(s), seed {res.seed}, {time.time() - start:.1f} s"
            done += "".join(f"  \n⚠ {html.escape(n)}" for n in res.notes)
            return gallery, res.infotexts[0], [str(p) for p in res.paths], res.seed, res.infotexts, done

        @_ui
        def run_grid(d, progress=gr.Progress()):
            x_values = parse_values(d[c.x_values])
            y_values = parse_values(d[c.y_values], integers=d[c.y_kind] == "seed") if d[c.y_kind] != "none" else []
            req = GridRequest(request(d, weights(d), blocks(d)), x_adapter=d[c.x_adapter] or "", x_values=x_values,
                              y_kind=d[c.y_kind], y_adapter=d[c.y_adapter], y_values=y_values)
            start = time.time()
            res = studio.grid(req, progress=_progress(progress))
            files = [str(res.path)] + [str(p) for p in res.cells]
            done = f"X/Y grid of {len(res.cells)} images, {time.time() - start:.1f} s"
            return [(str(res.path), "X/Y grid")], res.infotext, files, res.seed, [res.infotext], done

        # this body runs on page load and pick changes, when every component of the page exists
        common = {c.prompt, c.negative, c.seed, c.steps, c.guidance, c.width, c.height, c.sampler, c.num_images,
                  *(x for _, *parts in rows for x in parts)}
        outs = [c.gallery, c.infotext, c.files, c.last_seed, c.texts, c.gen_status]
        kw = {"outputs": outs, "concurrency_id": "model", "show_progress_on": [c.gen_status]}  # keep the images
        c.generate_btn.click(run, inputs=common, **kw)
        c.prompt.submit(run, inputs=common, **kw)
        c.grid_btn.click(run_grid, inputs={*common, c.x_adapter, c.x_values, c.y_kind, c.y_adapter, c.y_values},
                         **kw)


def _wire_generate(studio: Studio, c: SimpleNamespace) -> None:
    def reuse(last, current):
        if last is None:
            gr.Info("no image generated yet in this page")
            return current
        return last

    c.random_seed.click(lambda: -1, outputs=c.seed, queue=False)
    c.reuse_seed.click(reuse, inputs=[c.last_seed, c.seed], outputs=c.seed, queue=False)

    def show_selected(texts, evt: gr.SelectData):
        return texts[evt.index] if texts and 0 <= evt.index < len(texts) else (texts[0] if texts else "")

    c.gallery.select(show_selected, inputs=c.texts, outputs=c.infotext, queue=False)


# ---------------------------------------------------------------------------------------------- Train
def preset_choices(spec: str) -> list[tuple[str, str]]:
    """The preset radio's (label, key) pairs with the numbers a run on base ``spec`` trains with (on the toy
    ``tiny`` base the tiny-scaled ones, ``presets.for_base``; the page showed the real-base numbers there)."""
    return [(f"{k}: {p['steps']} steps · rank {p['rank']} · lr {p['lr']:g}", k)
            for k, p in ((k, for_base(r, spec)) for k, r in PRESETS.items())]


def preset_info(key: str, spec: str) -> str:
    """What preset ``key`` trains on base ``spec`` (``Recipe.describe`` of its version for that base)."""
    return for_base(PRESETS[key], spec).describe()


def _train_tab(studio: Studio, c: SimpleNamespace) -> None:
    native = studio.native_size
    folders = studio.image_folders()
    with gr.Row():
        with gr.Column(scale=5):
            c.source = gr.Radio(list(SOURCES), value=SOURCES[0] if studio.train_roots else SOURCES[1],
                                label="Images", elem_id="train-source")
            with gr.Row(visible=bool(studio.train_roots)) as c.folder_row:
                c.folder = gr.Dropdown(folders, value=folders[0] if folders else None, allow_custom_value=True,
                                       label="Image folder on the server",
                                       info="inside: " + (", ".join(str(r) for r in studio.train_roots)
                                                          or "no --train-root given"), elem_id="train-folder",
                                       scale=4)
                c.refresh_folders = gr.Button("↻", size="sm", scale=0, elem_id="train-folders-refresh")
            c.uploads = gr.File(label="Upload images, .txt captions or a .zip", file_count="multiple",
                                file_types=["image", ".zip", ".txt", ".caption"], elem_id="train-uploads",
                                visible=not studio.train_roots)
            with gr.Row():
                c.name = gr.Textbox(label="Adapter name", placeholder="my-style", elem_id="train-name")
                c.trigger = gr.Textbox(label="Trigger word", placeholder="mystyle", elem_id="train-trigger")
            spec = studio.base.spec
            c.preset = gr.Radio(preset_choices(spec), value=WEBUI_DEFAULT, label="Preset", elem_id="train-preset")
            c.preset_info = gr.Markdown(preset_info(WEBUI_DEFAULT, spec), elem_id="train-preset-info")
            with gr.Accordion("Advanced (0 = the preset's value)", open=False, elem_id="train-advanced"):
                with gr.Row():
                    c.t_steps = gr.Number(0, label="Steps", precision=0, minimum=0, maximum=MAX_STEPS,
                                          elem_id="train-steps")
                    c.t_rank = gr.Number(0, label="Rank", precision=0, minimum=0, maximum=MAX_RANK,
                                         elem_id="train-rank")
                    c.t_lr = gr.Number(0, label="Learning rate", minimum=0, elem_id="train-lr")
                with gr.Row():
                    c.t_res = gr.Number(max(64, min(native, 1024)), label="Resolution", precision=0, minimum=64,
                                        maximum=max_resolution(native), step=64, elem_id="train-resolution")
                    c.t_sample_every = gr.Number(-1, label="Sample every N steps (-1 = 4 times, 0 = never)",
                                                 precision=0, elem_id="train-sample-every")
                    c.t_sample_steps = gr.Number(20, label="Sample denoising steps", precision=0, minimum=1,
                                                 maximum=MAX_SAMPLE_STEPS, elem_id="train-sample-steps")
                    c.t_tokens = gr.Number(-1, label="Learnt trigger tokens (-1 = the preset's, 0 = off)",
                                           precision=0, minimum=-1, maximum=64, elem_id="train-tokens")
                with gr.Row():
                    c.t_te = gr.Checkbox(False, label="Train the text encoder too", elem_id="train-te")
                    c.t_te_lr = gr.Number(0, label="Text-encoder learning rate (0 = the UNet's)", minimum=0,
                                          elem_id="train-te-lr")
                    c.t_batch = gr.Number(0, label="Batch size", precision=0, minimum=0, maximum=MAX_BATCH,
                                          elem_id="train-batch")
                    c.t_alpha = gr.Number(0, label="Alpha (0 = rank)", minimum=0, elem_id="train-alpha")
                with gr.Row():
                    c.t_dropout = gr.Slider(0, 0.5, value=0, step=0.01, label="Caption dropout",
                                            elem_id="train-caption-dropout")
                    c.t_sched = gr.Dropdown(["(preset)", *SCHEDULERS], value="(preset)", label="Scheduler",
                                            elem_id="train-scheduler")
                    c.t_reg = gr.Dropdown(["", *folders], value="", allow_custom_value=True,
                                          label="Regularization folder (inside the training roots; optional)",
                                          elem_id="train-reg", visible=bool(studio.train_roots))
                    c.t_skip = gr.Checkbox(False, label="Skip unreadable images (listed in the status)",
                                           elem_id="train-skip-bad")
                    c.t_slot = gr.Number(None, label="Orthogonal slot (empty = off)", precision=0, minimum=0,
                                         maximum=1023, elem_id="train-slot",
                                         info="adapters trained in different slots at the same rank do not "
                                              "overlap when blended (train --slot)")
                c.t_prompts = gr.Textbox("", lines=3, label="Sample prompts (one per line; empty = the trigger)",
                                         elem_id="train-sample-prompts")
            with gr.Row():
                c.start = gr.Button("Start training", variant="primary", elem_id="train-start")
                c.stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
                c.save_partial = gr.Button("Save what was learnt so far", elem_id="train-save-partial")
                c.resume = gr.Button("Resume", elem_id="train-resume")
        with gr.Column(scale=6):
            c.status = gr.Markdown(format_status(studio.training_status()), elem_id="train-status",
                                   elem_classes=["status-line"])
            c.bar = gr.HTML(_bar(studio.training_status()), elem_id="train-bar")
            c.loss_plot = gr.LinePlot(loss_frame(studio.training_status()), x="step", y="loss", title="Loss",
                                      height=220, elem_id="train-loss")
            c.samples = gr.Gallery(label="Samples", columns=4, height=360, elem_id="train-samples",
                                   interactive=False)
    c.timer = gr.Timer(1.0, active=False)


def _bar(s: dict | None) -> str:
    if not s:
        return ""
    return (f'<progress value="{int(s["step"])}" max="{max(1, int(s["steps"]))}" style="width:100%;height:14px">'
            f'</progress><div style="font-size:12px">{html.escape(s["status"])}</div>')


def _wire_train(studio: Studio, c: SimpleNamespace, lib_outputs: list, lib_refresh) -> None:
    c.preset.change(lambda k: preset_info(k, studio.base.spec), c.preset, c.preset_info, queue=False)
    c.source.change(lambda s: (gr.Row(visible=s == SOURCES[0]), gr.File(visible=s == SOURCES[1])), c.source,
                    [c.folder_row, c.uploads], queue=False)
    c.refresh_folders.click(_ui(lambda: gr.Dropdown(choices=studio.image_folders())), outputs=c.folder)

    @_ui
    def start(source, folder, uploads, name, trigger, preset, steps, rank, lr, res, sample_every, sample_steps,
              tokens, te, te_lr, batch, alpha, dropout, sched, reg, skip, prompts, slot):
        upload = source == SOURCES[1]
        if upload and not uploads:
            raise gr.Error("choose images (or a .zip) to upload first")
        # numbers pass as sent (inf, nan, 1e300 included): the request check refuses them with their range
        req = TrainRequest(name=name or "", folder=None if upload else folder, uploads=list(uploads or []) if upload
                           else [], trigger=trigger or "", preset=preset, steps=steps or None, rank=rank or None,
                           lr=float(lr or 0) or None, resolution=res or None,
                           sample_every=None if sample_every is None or sample_every < 0 else sample_every,
                           sample_steps=20 if sample_steps is None else sample_steps,
                           train_tokens=None if tokens is None or tokens < 0 else int(tokens),
                           train_text_encoder=True if te else None, te_lr=te_lr or None, batch_size=batch or None,
                           alpha=alpha or None, caption_dropout=dropout or None,
                           lr_scheduler=None if sched in (None, "", "(preset)") else sched,
                           reg_folder=reg or None, skip_bad_images=bool(skip), sample_prompts=prompts or "",
                           slot=None if slot is None or slot == "" else slot)
        studio.start_training(req)
        s = studio.training_status()
        return format_status(s), _bar(s), [], gr.Timer(active=True)

    c.start.click(start, inputs=[c.source, c.folder, c.uploads, c.name, c.trigger, c.preset, c.t_steps, c.t_rank,
                                 c.t_lr, c.t_res, c.t_sample_every, c.t_sample_steps, c.t_tokens, c.t_te,
                                 c.t_te_lr, c.t_batch, c.t_alpha, c.t_dropout, c.t_sched, c.t_reg, c.t_skip,
                                 c.t_prompts, c.t_slot],
                  outputs=[c.status, c.bar, c.samples, c.timer], concurrency_id="train-start",
                  show_progress_on=[c.status])
    c.stop.click(_ui(lambda: (studio.stop_training(), format_status(studio.training_status()))[1]),
                 outputs=c.status)

    def relaunch(action):
        @_ui
        def go():
            action()
            s = studio.training_status()
            return format_status(s), _bar(s), gr.Timer(active=True)
        return go

    c.save_partial.click(relaunch(studio.save_stopped), outputs=[c.status, c.bar, c.timer])
    c.resume.click(relaunch(studio.resume_stopped), outputs=[c.status, c.bar, c.timer])

    def poll(version):
        s = studio.training_status()
        active = bool(s and s["status"] in ("starting", "running"))
        samples = [(p, sample_caption(p)) for p in (s or {}).get("samples", [])]
        if s and s["status"] == "failed":
            gr.Warning(s["message"])
        lib = lib_refresh(version)
        return (format_status(s), _bar(s), samples, loss_frame(s), gr.Timer(active=active), *lib)

    c.timer.tick(poll, inputs=[c.lib_version],
                 outputs=[c.status, c.bar, c.samples, c.loss_plot, c.timer, *lib_outputs],
                 show_progress="hidden", concurrency_limit=None)


# ---------------------------------------------------------------------------------------------- Library
def _library_tab(studio: Studio, c: SimpleNamespace) -> None:
    names = studio.adapters()
    with gr.Row():
        # shares of the page's width (name, family, rank, trigger, training, hash, size): the short columns get
        # room for their header on one line, the name and the training summary wrap
        c.lib_table = gr.Dataframe(studio.library_rows(), headers=TABLE_HEADERS, interactive=False, wrap=True,
                                   column_widths=["20%", "8%", "6%", "11%", "28%", "15%", "12%"],
                                   label=f"Adapters in {studio.library.root}", elem_id="library-table")
    with gr.Row():
        c.lib_thumbs = gr.Gallery(studio.thumbnails(), label="Thumbnails", columns=8, height=200,
                                  elem_id="library-thumbs", interactive=False, allow_preview=False,
                                  fit_columns=False, object_fit="contain")
    with gr.Row():
        c.lib_refresh = gr.Button("↻ Refresh", size="sm", elem_id="library-refresh", scale=0, min_width=120)
        c.lib_status = gr.Markdown("", elem_id="library-status", min_height=24, elem_classes=["status-line"])
    with gr.Row():
        with gr.Column():
            c.lib_pick = gr.Dropdown(names, value=None, label="Adapter", allow_custom_value=True,
                                     elem_id="library-pick")
            with gr.Row():
                c.lib_thumb = gr.Image(label="Thumbnail", height=180, interactive=False, elem_id="library-thumb",
                                       scale=1, min_width=200, type="filepath")
                c.lib_details = gr.JSON(label="Details", elem_id="library-details", open=True, scale=3)
            with gr.Row():
                c.conv_to = gr.Radio(["kohya", "peft"], value="peft", label="Convert to", elem_id="convert-to")
                c.conv_name = gr.Textbox(label="New name (empty: NAME-layout)", elem_id="convert-name")
            c.conv_btn = gr.Button("Convert", elem_id="convert-btn")
            with gr.Group(elem_id="resize-group"):
                with gr.Row():
                    c.rs_rule = gr.Radio(list(RESIZE_RULES), value="energy", label="Resize by",
                                         info=RESIZE_RULES["energy"][2], elem_id="resize-rule", scale=3)
                    c.rs_value = gr.Textbox("0.9", label="Value", elem_id="resize-value", scale=1)
                with gr.Row():
                    c.rs_max_rank = gr.Number(0, label="Max rank (0 = none)", precision=0, minimum=0,
                                              elem_id="resize-max-rank")
                    c.rs_name = gr.Textbox(label="New name (empty: NAME-resized)", elem_id="resize-name")
                    c.rs_measure = gr.Checkbox(False, label="measure the UNet change (uses the model)",
                                               elem_id="resize-measure")
            c.rs_btn = gr.Button("Resize into a new adapter", elem_id="resize-btn")
            with gr.Row():
                c.del_confirm = gr.Checkbox(False, label="yes, delete this file", elem_id="delete-confirm")
                c.del_btn = gr.Button("Delete", variant="stop", elem_id="delete-btn")
        with gr.Column():
            c.imp_file = gr.File(label="Import an adapter (.safetensors)", file_types=[".safetensors"],
                                 elem_id="import-file")
            c.imp_name = gr.Textbox(label="Name in the library (empty: the file's name)", elem_id="import-name")
            c.imp_btn = gr.Button("Import", elem_id="import-btn")
            c.merge_pick = gr.Dropdown(names, multiselect=True, allow_custom_value=True, label="Merge: adapters",
                                       elem_id="merge-pick")
            c.merge_weights = gr.Textbox("", label="Merge: weights in the same order (w or w_unet/w_te)",
                                         placeholder="0.5, 0.5", elem_id="merge-weights")
            with gr.Row():
                c.merge_name = gr.Textbox(label="Merged name", elem_id="merge-name")
                c.merge_rank = gr.Number(0, label="Rank (0 = exact)", precision=0, minimum=0, elem_id="merge-rank")
            c.merge_btn = gr.Button("Merge", elem_id="merge-btn")
    c.rs_table = gr.Markdown("", elem_id="resize-table")  # the whole width: the table has seven columns
    c.lib_version = gr.State(studio.library.version)


def _merge_weights(names: list[str], text: str) -> dict:
    parts = [p.strip() for p in (text or "").split(",") if p.strip()]
    if not parts:
        parts = ["1"] * len(names)
    if len(parts) != len(names):
        raise gr.Error(f"give one weight per picked adapter ({len(names)}), e.g. " + ", ".join(["0.5"] * len(names)))
    out = {}
    for n, p in zip(names, parts):
        try:
            ws = [float(x) for x in p.split("/")]
        except ValueError:
            raise gr.Error(f"weight {p!r} for {n} is not a number (use w or w_unet/w_te)") from None
        out[n] = ws[0] if len(ws) == 1 else (ws[0], ws[1])
    return out


def _wire_library(studio: Studio, c: SimpleNamespace) -> tuple[list, callable]:
    outputs = [c.lib_table, c.lib_thumbs, c.lib_pick, c.merge_pick, c.picked, c.x_adapter, c.y_adapter,
               c.br_pick, c.lib_version]

    def refresh(version=None, force=False):
        if not force and version == studio.library.version:
            return tuple(gr.skip() for _ in outputs)
        names = studio.adapters()
        choice = gr.Dropdown(choices=names)
        return (studio.library_rows(), studio.thumbnails(), choice, choice, choice, choice, choice, choice,
                studio.library.version)

    def after(message: str):
        return (message, *refresh(force=True))

    c.lib_refresh.click(_ui(lambda: refresh(force=True)), outputs=outputs)

    @_ui
    def show(name):
        if not name:
            return None, None
        thumb = studio.library.info(studio.library.find(name)).thumbnail
        return (str(thumb) if thumb else None), studio.adapter_details(name)

    c.lib_pick.change(show, c.lib_pick, [c.lib_thumb, c.lib_details])

    @_ui
    def do_import(file, name):
        if not file:
            raise gr.Error("choose a .safetensors file to import")
        return *after(f"imported **{studio.import_adapter(file, name or None)}**"), None, ""

    @_ui
    def do_convert(name, to, new):
        if not name:
            raise gr.Error("pick an adapter first")
        return after(f"wrote **{studio.convert_adapter(name, to, new or None)}** ({to} layout)")

    @_ui
    def do_resize(name, rule, value, max_rank, new, measure):
        if not name:
            raise gr.Error("pick an adapter first")
        made, table = studio.resize_adapter(name, new or None, rule=rule, value=value, max_rank=max_rank,
                                            measure=bool(measure))
        return (*after(f"resized **{name}** into **{made}**"), table)

    c.rs_rule.change(lambda r: (gr.Radio(info=RESIZE_RULES[r][2]), RESIZE_EXAMPLES[r]), c.rs_rule,
                     [c.rs_rule, c.rs_value], queue=False)

    @_ui
    def do_merge(names, weights, new, rank):
        if not names:
            raise gr.Error("pick the adapters to merge")
        merged = studio.merge_adapters(_merge_weights(names, weights), new or "", rank=int(rank or 0) or None)
        return after(f"merged into **{merged}**")

    @_ui
    def do_delete(name, confirm):
        if not name:
            raise gr.Error("pick an adapter first")
        if not confirm:
            raise gr.Error("tick 'yes, delete this file' to delete it")
        return after(f"deleted **{studio.delete_adapter(name)}**")

    outs = [c.lib_status, *outputs]
    kw = {"show_progress_on": [c.lib_status]}
    c.imp_btn.click(do_import, [c.imp_file, c.imp_name], outs + [c.imp_file, c.imp_name], **kw)
    c.conv_btn.click(do_convert, [c.lib_pick, c.conv_to, c.conv_name], outs, **kw)
    c.rs_btn.click(do_resize, [c.lib_pick, c.rs_rule, c.rs_value, c.rs_max_rank, c.rs_name, c.rs_measure],
                   outs + [c.rs_table], concurrency_id="model", **kw)
    c.merge_btn.click(do_merge, [c.merge_pick, c.merge_weights, c.merge_name, c.merge_rank], outs, **kw)
    c.del_btn.click(do_delete, [c.lib_pick, c.del_confirm], outs, **kw).then(lambda: False, outputs=c.del_confirm)
    return outputs, refresh


# ---------------------------------------------------------------------------------------------- Blend report
def _report_tab(studio: Studio, c: SimpleNamespace) -> None:
    gr.Markdown("How much the picked adapters' weight updates overlap, per UNet block and text encoder (`stylelora "
                "blend-report`); with two adapters, optionally a grid of pictures at every pair of weights.")
    with gr.Row():
        with gr.Column(scale=5):
            c.br_pick = gr.Dropdown(studio.adapters(), value=[], multiselect=True, allow_custom_value=True,
                                    label="Adapters to compare (two or more)", elem_id="report-pick")
            with gr.Accordion("Weight sweep (two adapters; uses the model)", open=False, elem_id="report-sweep"):
                c.br_sweep = gr.Checkbox(False, label="render the weight-sweep grid", elem_id="report-sweep-on")
                with gr.Row():
                    c.br_weights = gr.Textbox("0, 0.5, 1", label="Weights of both (a, b, … or start:stop:step)",
                                              elem_id="report-weights")
                    c.br_prompt = gr.Textbox("", label="Prompt after both trigger words (empty: a house by a lake)",
                                             elem_id="report-prompt")
                with gr.Row():
                    c.br_steps = gr.Number(20, label="Steps", precision=0, minimum=1, maximum=150,
                                           elem_id="report-steps")
                    c.br_cfg = gr.Number(5.0, label="Guidance (CFG)", minimum=0, elem_id="report-cfg")
                    c.br_seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="report-seed")
            with gr.Row():
                c.br_each = gr.Number(0.5, label="Suggested block weights: weight each", minimum=0,
                                      elem_id="report-suggest-weight")
                c.br_threshold = gr.Number(0.3, label="Contested from overlap (0..1)", minimum=0, maximum=1,
                                           elem_id="report-suggest-threshold")
            c.br_btn = gr.Button("Compare", variant="primary", elem_id="report-btn")
            c.br_status = gr.Markdown("", elem_id="report-status", min_height=24, elem_classes=["status-line"])
            c.br_suggest = gr.Markdown("", elem_id="report-suggest")
            c.br_table = gr.Markdown("", elem_id="report-table")
        with gr.Column(scale=4):
            c.br_grid = gr.Image(label="Weight sweep (rows: first adapter's weight, columns: second's)",
                                 interactive=False, type="filepath", elem_id="report-grid")

    @_ui
    def compare(names, sweep, weights, prompt, steps, cfg, seed, each, threshold):
        start = time.time()
        rep = studio.blend_report(names or [], sweep=bool(sweep), weights=weights or "", prompt=prompt or "",
                                  steps=int(steps if steps is not None else 20),
                                  guidance=float(cfg if cfg is not None else 5.0),
                                  seed=int(seed if seed is not None else 0),
                                  weight_each=0.5 if each is None else each,
                                  threshold=0.3 if threshold is None else threshold)
        done = f"{len(rep.result['pairs'])} pair(s) compared" + (", sweep grid rendered" if rep.grid else "")
        return (rep.table, (str(rep.grid) if rep.grid else None), f"{done}, {time.time() - start:.1f} s",
                rep.suggestion)

    c.br_btn.click(compare, [c.br_pick, c.br_sweep, c.br_weights, c.br_prompt, c.br_steps, c.br_cfg, c.br_seed,
                             c.br_each, c.br_threshold],
                   [c.br_table, c.br_grid, c.br_status, c.br_suggest], concurrency_id="model",
                   show_progress_on=[c.br_status])


# ---------------------------------------------------------------------------------------------- the page
def build_app(studio: Studio) -> gr.Blocks:
    """The whole page for ``studio``."""
    c = SimpleNamespace()
    with gr.Blocks(title="stylelora", analytics_enabled=False, **({} if _LAUNCH_STYLES else PAGE_STYLE)) as demo:
        c.demo = demo
        with gr.Row():
            gr.Markdown(f"## stylelora\nAdapters: `{studio.library.root}`")
            c.base = gr.Dropdown(list(studio.bases), value=studio.base_label, label="Base model", elem_id="base",
                                 scale=0, min_width=240)
            c.switch = gr.Button("Switch base", size="sm", scale=0, elem_id="base-switch")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                _generate_tab(studio, c)
            with gr.Tab("Train", id="train"):
                _train_tab(studio, c)
            with gr.Tab("Library", id="library"):
                _library_tab(studio, c)
            with gr.Tab("Blend report", id="report"):
                _report_tab(studio, c)
        lib_outputs, lib_refresh = _wire_library(studio, c)
        _wire_generate(studio, c)
        _wire_train(studio, c, lib_outputs, lib_refresh)

        @_ui
        def switch(label, preset):
            name = studio.switch_base(label)
            gr.Info(f"base {name} loaded")
            spec = studio.base.spec
            return (gr.Slider(value=studio.native_size), gr.Slider(value=studio.native_size),
                    gr.Radio(choices=preset_choices(spec)), preset_info(preset, spec))

        c.switch.click(switch, [c.base, c.preset], [c.width, c.height, c.preset, c.preset_info],
                       concurrency_id="model")

        def on_load(version):
            s = studio.training_status()
            running = bool(s and s["status"] in ("starting", "running"))
            return (gr.Timer(active=running), format_status(s), _bar(s), *lib_refresh(version, force=True))

        demo.load(on_load, inputs=c.lib_version, outputs=[c.timer, c.status, c.bar, *lib_outputs], queue=False)
    return demo


def launch(studio: Studio, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           block: bool = True, quiet: bool = False):
    """Serve the page on ``host:port`` (127.0.0.1 unless told otherwise); a public share link only if ``share``."""
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1)
    allowed, blocked = served_paths(studio)
    app, local_url, share_url = demo.launch(**(PAGE_STYLE if _LAUNCH_STYLES else {}),
        server_name=host, server_port=port, share=bool(share), prevent_thread_lock=not block, quiet=quiet,
        inbrowser=False, show_error=False, ssr_mode=False, mcp_server=False, allowed_paths=allowed,
        blocked_paths=blocked, max_file_size=studio.max_upload_bytes, theme=gr.themes.Soft(), footer_links=[],
    )
    return demo, local_url, share_url


def served_paths(studio: Studio) -> tuple[list[str], list[str]]:
    """(allowed_paths, blocked_paths) for Gradio: serve only what the page shows.

    Gradio serves every file under an allowed path at ``/gradio_api/file=<path>`` to anyone who can reach the
    page, so the allowed paths are the three folders that hold only images the UI wrote for the page
    (generated images, library thumbnails, copies of training samples), never the work folder itself (with
    ``--outputs .`` that is the user's project, ``.env`` included) nor the training runs in it (working copies
    of adapters, checkpoints, uploaded images). Blocked paths win over everything Gradio would serve: the
    adapter folder, the training runs and the training roots (unless a root holds a served folder).
    """
    allowed = [studio.outputs, studio.library.thumbs_dir, studio.work_dir / "samples"]
    for folder in allowed:
        folder.mkdir(parents=True, exist_ok=True)
    allowed = [folder.resolve() for folder in allowed]
    blocked = [studio.library.root, studio.work_dir / "train"]
    blocked += [r for r in studio.train_roots if not any(a == r or r in a.parents for a in allowed)]
    return [str(p) for p in allowed], [str(Path(p).resolve()) for p in blocked]
