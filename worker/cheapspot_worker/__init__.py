"""cheapspot worker: one image, three roles (train, anchor, serve). Never imports kopf or kubernetes."""
