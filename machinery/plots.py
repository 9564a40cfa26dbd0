"""out_dir/curves.png, redrawn from log.jsonl at every evaluation: the losses; recall@1 and MRR
beside TF-IDF's and chance's; on two-stage runs, re-ranking TF-IDF's top K beside its order."""

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
    its, last = [r["iter"] for r in records], records[-1]

    def series(key):  # None (a split without markers, a run without L_NSP) left as gaps
        return [float("nan") if r.get(key) is None else r[key] for r in records]

    two_stage = last.get("first_stage_recall@K") is not None
    fig, axes = plt.subplots(1, 3 if two_stage else 2, figsize=(15 if two_stage else 10, 3.6))
    for i, term in enumerate(("ntp", "nsp")):
        for split, style in (("train", ":"), ("val", "-")):
            axes[0].plot(its, series(f"{split}_{term}"), style, marker=".", color=f"C{i}",
                         label=f"L_{term.upper()} {split}")
    for i, metric in enumerate(("recall@1", "mrr")):
        color = f"C{i + 2}"
        axes[1].plot(its, series(metric), "-", marker=".", color=color, label=f"{metric} val")
        axes[1].plot(its, series(f"train_{metric}"), ":", color=color, label=f"{metric} train")
        if last.get(f"lexical_{metric}") is not None:
            axes[1].axhline(last[f"lexical_{metric}"], ls="--", color=color, lw=0.8,
                            label=f"{metric} TF-IDF")
        if chance.get(metric) is not None:
            axes[1].axhline(chance[metric], ls="-.", color="grey", lw=0.8,
                            label="chance" if i == 0 else None)
        if two_stage:  # the learned score re-ranking TF-IDF's top K, beside TF-IDF's own order
            axes[2].plot(its, series(f"reranked_{metric}"), "-", marker=".", color=color,
                         label=f"{metric} val, learned")
            axes[2].axhline(last[f"first_stage_{metric}"], ls="--", color=color, lw=0.8,
                            label=f"{metric} TF-IDF's order")
    titles = ["losses", "retrieval against the whole datastore"]
    if two_stage:
        k = last["first_stage_k"]
        axes[2].axhline(last["first_stage_recall@K"], ls="-.", color="grey", lw=0.8,
                        label=f"recall@{k}: the ceiling")
        titles.append(f"re-ranking TF-IDF's top {k}")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("iteration")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(log_path))))
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.14, top=0.84, wspace=0.18)
    tmp = png_path + ".tmp"  # written whole, then renamed: a viewer never sees half a file
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, png_path)
