"""Image classifiers that score decoded images, behind one interface.

``base``      :class:`~.base.ImageClassifier`, the interface the evaluation stage sees
``domain``    the small CNN of the stimulus domain (trained by :mod:`mindvis.train.classifier`)
``imagenet``  EfficientNet-Lite0 (ships offline) and ViT-H/14 (local weights), for natural images
``load``      :func:`~.load.load_image_classifier`: the one ``evaluate.classifier`` names
"""
