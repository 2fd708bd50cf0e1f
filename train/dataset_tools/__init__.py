"""Dataset tools: one-off commands that make and check data sets for training.

- ``prepare``: the official ILSVRC2012 archives (``imagenet``, ``extract``, ``devkit``) or a
  Hugging Face Hub copy (``hub_source``) -> the layout the loaders read;
- ``convert``: an ImageNet-layout folder -> WebDataset shards (``shard_writer``);
- ``check``: decode every image of a folder or shard set, list the unreadable ones.

They use the loader side (``train.data``: folder layout, shard format, image verification);
``train.data`` never imports them, so training does not depend on them.
"""
