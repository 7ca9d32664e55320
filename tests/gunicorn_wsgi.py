"""The WSGI module the gunicorn test serves: the digits model, added but not started."""

from flask import Flask

from ipcserve.adapters.digits import image_to_pixels
from ipcserve.adapters.digits import DigitsClassifier
from ipcserve.flask import IPCServe

app = Flask(__name__)
ipc = IPCServe(app)
ipc.add_model(DigitsClassifier(), kind="image", preprocess=image_to_pixels)
