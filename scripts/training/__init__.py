"""Data and models: the synthetic shapes generator, training and evaluating the default model
(COCO mAP, directly and through HTTP), and generated test images (the gigapixel TIFF)."""
