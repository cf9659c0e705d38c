"""The embedded default: what lets vtprune run, test and benchmark offline with nothing downloaded.

``tiny_llava`` builds and loads the tiny LLaVA-1.5-style model shipped in ``vtprune/assets/tiny-llava`` (its
tokenizer, processor, config, training step and greedy answering); ``synthetic`` draws the seeded MME-, GQA- and
POPE-style sets it was trained and is scored on (``scenes`` renders, ``templates`` / ``mme`` / ``gqa`` / ``pope``
ask, ``streams`` feeds training, ``writers`` and ``pope`` write the release layouts); ``trainer`` holds the
library part of ``scripts/train_tiny_llava.py`` (auxiliary losses and the vision-tower stage). Nothing here is
imported by the pruning core.
"""
