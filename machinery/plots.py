"""
The picture of one training run: out_dir/curves.png, redrawn from log.jsonl at every evaluation,
so a user looks at the run instead of reading its log.

Left: L_NTP and L_NSP on train and val against the iteration. Right: val recall@1 and MRR of the
learned retrieval (train's too, dotted: how far val is from what training fits), with the two
lines every learned number must beat: the training-free TF-IDF baseline and chance.
"""

import os

from machinery.checkpoint import read_jsonl


def plot_run(log_path, png_path, chance):
    """Draw log_path's records into png_path; chance is datastore.chance_metrics of the corpus."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    records, _ = read_jsonl(log_path)
    if not records:
        return
    its = [r["iter"] for r in records]

    def series(key):  # None (a split without markers, a run without L_NSP) left as gaps
        return [float("nan") if r.get(key) is None else r[key] for r in records]

    fig, (loss, ret) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, term in enumerate(("ntp", "nsp")):
        for split, style in (("train", ":"), ("val", "-")):
            loss.plot(its, series(f"{split}_{term}"), style, marker=".", color=f"C{i}",
                      label=f"L_{term.upper()} {split}")
    loss.set_xlabel("iteration")
    loss.set_title("losses")
    loss.legend(fontsize=7)
    for i, metric in enumerate(("recall@1", "mrr")):
        color = f"C{i + 2}"
        ret.plot(its, series(metric), "-", marker=".", color=color, label=f"{metric} val")
        ret.plot(its, series(f"train_{metric}"), ":", color=color, label=f"{metric} train")
        lexical = records[-1].get(f"lexical_{metric}")
        if lexical is not None:
            ret.axhline(lexical, ls="--", color=color, lw=0.8, label=f"{metric} TF-IDF")
        if chance.get(metric) is not None:
            ret.axhline(chance[metric], ls="-.", color="grey", lw=0.8,
                        label="chance" if i == 0 else None)
    ret.set_xlabel("iteration")
    ret.set_title("retrieval against the whole datastore")
    ret.legend(fontsize=7)
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(log_path))))
    fig.tight_layout()
    tmp = png_path + ".tmp"  # written whole, then renamed: a viewer never sees half a file
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, png_path)
