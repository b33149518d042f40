from twisted.application.service import ServiceMaker

imml_balancer = ServiceMaker(
    "imml-balancer", "imml.tap", "Balance Immich ML requests over many hosts.", "imml-balancer"
)
