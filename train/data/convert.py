"""``python -m train.data.convert``, the command's original name, kept working.

The command lives in ``train.dataset_tools.convert`` (also installed as ``imagenet-convert``): the
data package holds only what feeds training, and never imports the dataset tools.
"""

if __name__ == "__main__":
    import runpy

    runpy.run_module("train.dataset_tools.convert", run_name="__main__", alter_sys=True)
