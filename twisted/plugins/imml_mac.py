from twisted.application.service import ServiceMaker

imml_mac = ServiceMaker(
    "imml-mac", "imml.mac.tap", "Run Immich ML on this Mac, supervised (setup, doctor, launchagent).", "imml-mac"
)
