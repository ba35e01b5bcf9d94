"""``sparsepo-lite inspect-masks RUN --data FILE``: an HTML page of a SparsePO run's token masks, and how
much more weight its reward mask puts on sentiment words than on other tokens."""

from __future__ import annotations

from typing import List

HELP = "HTML page of a SparsePO run's token masks"


def add_parser(sub) -> None:
    p = sub.add_parser("inspect-masks", help=HELP, description=__doc__)
    p.add_argument("run_dir", help="a SparsePO training run folder")
    p.add_argument("--data", required=True, help="preference rows (TRL format)")
    p.add_argument("--pairs", type=int, default=20, help="pairs to show (the first N rows)")
    p.add_argument(
        "--out",
        default=None,
        help="the page, an .html file (default: RUN_DIR/masks.html); with VADER installed, its lift is written "
        "beside it (RUN_DIR/mask_lift.json for the default page, PAGE_lift.json for another)",
    )


def run(args, rest: List[str]) -> str:
    from ..eval.views import write_mask_viewer

    out, lift, shown = write_mask_viewer(args.run_dir, args.data, pairs=args.pairs, out=args.out)
    if lift:
        print(
            f"reward mask on VADER words {lift['mask_mean_sentiment']:.4f} vs other tokens "
            f"{lift['mask_mean_other']:.4f}: lift {lift['lift']:.2f}x (95% CI {lift['ci95'][0]:.2f}-"
            f"{lift['ci95'][1]:.2f}; chosen {lift['chosen']['lift']:.2f}x, rejected {lift['rejected']['lift']:.2f}x)",
            flush=True,
        )
    print(f"mask viewer: {out} ({shown} pairs)", flush=True)
    return out
