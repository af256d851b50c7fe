"""``stylelora webui --base BASE --adapters DIR [--train-root DIR …] [--host 127.0.0.1] [--port 7860] [--share]``."""

from __future__ import annotations

import signal

from . import add_threads_arg
from .generate import add_quantize_arg


def register(sub) -> None:
    p = sub.add_parser("webui", help="start the web UI (generate with sliders, train, manage the adapter library)",
                       description="Serve the web UI on 127.0.0.1 (this machine only) unless --host says otherwise. "
                                   "It reads and writes adapters only in --adapters and image folders only under "
                                   "--train-root.")
    p.add_argument("--base", action="append", required=True, metavar="BASE",
                   help="base model: 'tiny', a diffusers folder, a .safetensors checkpoint or a hub id. Give it "
                        "several times to offer a switch between them in the page; the first is loaded at start")
    p.add_argument("--base-config", help="diffusers folder with the config of a single-file --base (offline use)")
    p.add_argument("--adapters", default="loras", metavar="DIR",
                   help="adapter library folder (created if missing); the only place adapters are read and written")
    p.add_argument("--train-root", action="append", default=[], metavar="DIR",
                   help="folder whose image folders may be picked for training (repeatable); uploads need none")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 exposes the UI to your network (no login!)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--outputs", metavar="DIR", help="work folder: generated images go to DIR/outputs (default: a "
                                                     "temp folder removed on exit). Only DIR/outputs, DIR/thumbs "
                                                     "and DIR/samples are served to the page, never DIR itself")
    p.add_argument("--max-upload-mb", type=int, default=1024,
                   help="largest accepted upload, and the most one Train upload may unpack to (zip archives "
                        "included)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps … (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="weights dtype (default: fp16 on a GPU, fp32 on CPU)")
    add_quantize_arg(p)
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError
    from .generate import device_dtype, place_base

    if args.port < 0 or args.port > 65535:
        raise ConfigError(f"--port must be 0..65535, got {args.port}")
    device, dtype = device_dtype(args)

    def loader(spec: str):
        from ..models import load_base

        return place_base(load_base(spec, dtype=dtype, base_config=args.base_config, quantize=args.quantize_base),
                          device)

    from ..webui import Studio, launch

    terminated = []

    def on_term(signum, frame):
        # SIGTERM (systemd, docker stop, kill) ends the server like Ctrl+C does, so the finally below runs and the
        # temporary work folder (stylelora-webui-*) is removed instead of left behind. Installed before anything is
        # loaded: a SIGTERM that came between the "press Ctrl+C" line and a later install ended the process at once.
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        labels = {}
        for spec in args.base:
            labels.setdefault(spec, spec)
        print(f"loading base {args.base[0]} …", flush=True)
        studio = Studio(loader(args.base[0]), args.adapters, args.train_root, bases=labels, loader=loader,
                        work_dir=args.outputs, max_upload_mb=args.max_upload_mb)
        try:
            try:
                demo, url, share_url = launch(studio, host=args.host, port=args.port, share=args.share, block=False,
                                              quiet=True)
            except OSError as e:
                raise ConfigError(f"cannot serve on {args.host}:{args.port} ({e}); pass another --port") from None
            print(f"stylelora web UI on {url}" + (f" and {share_url} (public link)" if share_url else ""), flush=True)
            if args.host not in ("127.0.0.1", "localhost", "::1"):
                print(f"warning: listening on {args.host}: anyone who can reach this machine can use the UI",
                      flush=True)
            print("press Ctrl+C to stop", flush=True)
            demo.block_thread()  # returns on Ctrl+C (or SIGTERM), after closing the server
        finally:
            studio.close()
    except KeyboardInterrupt:
        if not terminated:
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 128 + signal.SIGTERM if terminated else 0
