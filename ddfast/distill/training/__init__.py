"""Training support of the distillation loops: real data, networks, and how networks are trained.

- ``data``: the datasets as normalised tensors, with a validation split carved from the training set;
  ``folders``: trees of image files (Tiny-ImageNet, ImageFolder), decoded once and cached; ``zca``: ZCA whitening;
- ``models``: the ConvNet and ResNet-18, named by ``ModelSpec``; ``augment``: DSA;
- ``seeding``: seeds derived from names, seeded scopes that leave the caller's RNG alone;
- ``loop``: the shared SGD training loop and accuracy on a split;
- ``evaluate``: the evaluation protocol (fresh networks, learning rate chosen on the validation
  split) and the random-real baseline;
- ``pretrain``: cached pools of networks pre-trained on the real data (CMI, MIM4DD);
- ``buffers``: MTT's expert trajectories.
"""
